"""tuneforge studio: web pages for runs, comparisons, data, jobs, a playground and feedback.

A router on the serve app (see :mod:`.app`), a client of the run folders and the jobs API.
"""
