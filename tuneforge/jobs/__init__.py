"""Fine-tuning as a service: OpenAI's files and fine-tuning jobs API over a database queue.

- :mod:`.store`: the database (SQLite in the jobs folder, or PostgreSQL): files, jobs, events,
  checkpoints; every state change one conditional UPDATE;
- :mod:`.files`: uploads stored content-addressed, written atomically;
- :mod:`.api`: the router on the serve app (``/v1/files``, ``/v1/fine_tuning/jobs``) and the
  lookup that serves a succeeded job's model;
- :mod:`.worker`: claims jobs, checks their data, trains them as ordinary run folders;
- :mod:`.cli`: ``tuneforge jobs serve`` and ``tuneforge jobs worker``.
"""
