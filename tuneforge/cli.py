"""The `tuneforge` command. Subcommands stay thin: parse, call a library function, print.

User errors (TuneforgeError) end with their message on stderr and exit code 2, never a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from tuneforge import __version__
from tuneforge.errors import TuneforgeError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except TuneforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge",
        description="Fine-tune a pretrained language model on your own data.",
    )
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    from tuneforge.data.cli import register as register_data
    from tuneforge.feedback.cli import register as register_feedback

    register_data(sub)

    from tuneforge.serve.cli import register as register_serve

    register_serve(sub)

    from tuneforge.eval.cli import register as register_eval

    register_eval(sub)
    register_feedback(sub)

    from tuneforge.score import register as register_score

    register_score(sub)

    from tuneforge.experiments.cli import register as register_experiments

    register_experiments(sub)  # sweep, curve

    from tuneforge.jobs.cli import register as register_jobs

    register_jobs(sub)  # jobs serve, jobs worker

    from tuneforge.studio.cli import register as register_studio

    register_studio(sub)  # the web studio

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=cmd_train)

    for name, helptext in (("generate", "generate a reply from a model or a run"),
                           ("chat", "chat with a model or a run in the terminal")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="a run folder, builtin:NAME, tiny:ARCH, a folder or .gguf")
        if name == "generate":
            p.add_argument("--prompt", action="append", required=True,
                           help="user message (repeat for several prompts)")
        p.add_argument("--system", help="system message")
        p.add_argument("--max-new-tokens", type=int, default=200)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                       help="fp32: exactly model.generate; bf16: faster on a bf16 CPU (bench/README.md), "
                            "greedy near-ties may flip")
        p.add_argument("--json", action="store_true", help="print JSON lines")
        p.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    p = sub.add_parser("demo", help="fine-tune the built-in model on the support-ticket task")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--epochs", type=float, default=None, help="override the demo's epochs")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N tests")
    p.add_argument("--few-shot", type=int, default=3, metavar="K",
                   help="solved training tickets in the base few-shot prompt (default 3)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export a run: PEFT adapter, merged model, or GGUF")
    p.add_argument("run", help="a run folder written by `tuneforge train`")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--merge", action="store_true",
                   help="merge the adapter into the base weights (implied by --format gguf)")
    p.add_argument("--format", default="safetensors", help="safetensors (default) or gguf")
    p.add_argument("--dtype", help="safetensors: f32 (default), bf16, f16; "
                                   "gguf: f16 (default), bf16, f32, q8_0")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=cmd_export)
    return parser


def cmd_train(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.recipes import run_recipe

    config = load_config(args.config, args.overrides)
    summary = run_recipe(config, resume=args.resume, overwrite=args.overwrite)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def _sampling(args) -> dict:
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise TuneforgeError("--max-new-tokens must be >= 1, --temperature >= 0, 0 < --top-p <= 1")
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "seed": args.seed, "precision": args.precision}


def cmd_generate(args) -> int:
    from tuneforge.generation import generate_reply
    from tuneforge.models.runs import load_for_inference

    sampling = _sampling(args)
    model, tokenizer, _ = load_for_inference(args.model)
    for prompt in args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        reply = generate_reply(model, tokenizer, messages, **sampling)
        print(json.dumps({"prompt": prompt, "reply": reply}) if args.json else reply, flush=True)
    return 0


def cmd_chat(args) -> int:
    from tuneforge.generation import generate_reply
    from tuneforge.models.runs import load_for_inference

    sampling = _sampling(args)
    model, tokenizer, description = load_for_inference(args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"chatting with {description}; /reset clears the history, /exit or Ctrl-D quits",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = generate_reply(model, tokenizer, system + history, **sampling)
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)


def cmd_demo(args) -> int:
    from tuneforge.demo import run_demo

    run_demo(args.output_dir, epochs=args.epochs, max_steps=args.max_steps,
             test_limit=args.test_limit, few_shot=args.few_shot)
    return 0


def cmd_export(args) -> int:
    from tuneforge.export import export_run

    manifest = export_run(args.run, args.out, merge=args.merge, fmt=args.format, dtype=args.dtype,
                          overwrite=args.overwrite)
    files = {name: info["bytes"] for name, info in manifest["files"].items()}
    print(json.dumps({"out": args.out, "kind": manifest["kind"], "dtype": manifest["dtype"],
                      "files": files}, indent=2))
    return 0


def _quiet_libraries() -> None:
    """Keep library chatter (conversion progress bars, hub notices) out of the user's way."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
