"""The ``nnqc-pipe`` command line: one sub-command per workflow stage (called by the rules), plus ``check``.

Options that carry config sections take JSON strings, so a rule passes ``params`` straight through. The
per-subject stages take a chunk of subjects (``--subjects`` or ``--tasks``), path patterns with ``{subject}``
(``{source}``, ``{level}``) placeholders, and ``--record``: the chunk record they write last (see
:mod:`nnqc_pipe.chunks`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from . import __version__


def _json(text: str) -> Any:
    return json.loads(text)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _label_names(text: str) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(text).items()}


def _optional(text: str) -> str | None:
    return None if text in ("", "none", "None") else text


# sub-command -> (module:function, options); modules are imported only when their command runs, so the CPU
# stages start without loading torch.
Command = tuple[str, list[tuple[str, dict[str, Any]]]]

COMMANDS: dict[str, Command] = {
    "demo-cohort": ("stages:demo_cohort", [
        ("--out-dir", {"required": True}),
        ("--n-subjects", {"type": int, "required": True}),
        ("--seed", {"type": int, "required": True}),
    ]),
    "inspect": ("stages:inspect", [
        ("--subjects", {"nargs": "+", "required": True}),
        ("--image", {"required": True}),
        ("--label", {"type": _optional, "default": None}),
        ("--label-values", {"type": _int_list, "required": True}),
        ("--out", {"required": True}),
        ("--record", {"required": True}),
    ]),
    "split": ("stages:split", [
        ("--inspect-chunks", {"nargs": "+", "required": True}),
        ("--subjects-tsv", {"required": True}),
        ("--split-tsv", {"required": True}),
        ("--test-fraction", {"type": float, "required": True}),
        ("--val-fraction", {"type": float, "required": True}),
        ("--seed", {"type": int, "required": True}),
        ("--on-bad-subject", {"choices": ["exclude", "fail"], "default": "exclude"}),
    ]),
    "fingerprint": ("stages:fingerprint", [
        ("--split-tsv", {"required": True}),
        ("--inspect-dir", {"required": True}),
        ("--modality", {"required": True}),
        ("--label-names", {"type": _label_names, "required": True}),
        ("--out", {"required": True}),
    ]),
    "plan": ("stages:plan", [
        ("--fingerprint-json", {"required": True}),
        ("--overrides", {"type": _json, "required": True}),
        ("--out", {"required": True}),
    ]),
    "preprocess": ("stages:preprocess", [
        ("--subjects", {"nargs": "+", "required": True}),
        ("--image", {"required": True}),
        ("--label", {"type": _optional, "default": None}),
        ("--plan-json", {"required": True}),
        ("--out", {"required": True}),
        ("--record", {"required": True}),
    ]),
    "degrade": ("stages:degrade", [
        ("--subjects", {"nargs": "+", "required": True}),
        ("--image", {"required": True}),
        ("--label", {"required": True}),
        ("--plan-json", {"required": True}),
        ("--seed", {"type": int, "required": True}),
        ("--levels", {"type": _int_list, "required": True}),
        ("--out-masks", {"required": True}),
        ("--manifest", {"required": True}),
        ("--record", {"required": True}),
    ]),
    "degrade-manifest": ("stages:degrade_manifest", [
        ("--chunks", {"nargs": "+", "required": True}),
        ("--out", {"required": True}),
    ]),
    "embed": ("model_stages:embed", [
        ("--subjects", {"nargs": "+", "required": True}),
        ("--npz", {"required": True}),
        ("--plan-json", {"required": True}),
        ("--settings", {"type": _json, "required": True}),
        ("--device", {"default": "auto"}),
        ("--out", {"required": True}),
        ("--record", {"required": True}),
    ]),
    "train-vae": ("model_stages:train_vae", [
        ("--split-tsv", {"required": True}),
        ("--preprocessed-dir", {"required": True}),
        ("--plan-json", {"required": True}),
        ("--settings", {"type": _json, "required": True}),
        ("--out-dir", {"required": True}),
        ("--device", {"default": "auto"}),
        ("--seed", {"type": int, "default": 0}),
    ]),
    "train-ldm": ("model_stages:train_ldm", [
        ("--split-tsv", {"required": True}),
        ("--preprocessed-dir", {"required": True}),
        ("--embeddings-dir", {"required": True}),
        ("--plan-json", {"required": True}),
        ("--settings", {"type": _json, "required": True}),
        ("--vae", {"required": True}),
        ("--out-dir", {"required": True}),
        ("--device", {"default": "auto"}),
        ("--seed", {"type": int, "default": 0}),
    ]),
    "infer": ("model_stages:infer", [
        ("--tasks", {"type": _json, "required": True}),
        ("--npz", {"required": True}),
        ("--embeddings", {"type": _optional, "default": None}),
        ("--candidates", {"type": _json, "required": True}),
        ("--model-dir", {"required": True}),
        ("--inference", {"type": _json, "required": True}),
        ("--device", {"default": "auto"}),
        ("--seed", {"type": int, "default": 0}),
        ("--out-pgt", {"required": True}),
        ("--out-slices", {"required": True}),
        ("--out-errors", {"type": _optional, "default": None}),
        ("--record", {"required": True}),
    ]),
    "score": ("stages:score", [
        ("--cohort", {"required": True}),
        ("--tasks", {"type": _json, "required": True}),
        ("--npz", {"required": True}),
        ("--plan-json", {"required": True}),
        ("--candidates", {"type": _json, "required": True}),
        ("--pgt", {"required": True}),
        ("--gt", {"type": _optional, "default": None}),
        ("--slices", {"required": True}),
        ("--tolerance-mm", {"type": float, "required": True}),
        ("--out", {"required": True}),
        ("--record", {"required": True}),
    ]),
    "report": ("stages:report", [
        ("--score-chunks", {"nargs": "+", "required": True}),
        ("--out-dir", {"required": True}),
        ("--cohort", {"required": True}),
        ("--qc-pass-dsc", {"type": float, "required": True}),
        ("--config-digest", {"required": True}),
        ("--model-dir", {"required": True}),
        ("--figures-dir", {"required": True}),
        ("--results-dir", {"required": True}),
        ("--n-overlays", {"type": int, "default": 6}),
    ]),
    "check": ("check:check", [
        ("--image", {"required": True}),
        ("--mask", {"required": True}),
        ("--model-dir", {"required": True}),
        ("--out", {"default": None}),
        ("--plan", {"default": None}),
        ("--ddim-steps", {"type": int, "default": 20}),
        ("--samples", {"type": int, "default": 1}),
        ("--device", {"default": "auto"}),
        ("--seed", {"type": int, "default": 0}),
    ]),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="nnqc-pipe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nnqc-pipe {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (target, options) in COMMANDS.items():
        p = sub.add_parser(name, help=f"stage {target.replace(':', '.')}")
        for flag, kwargs in options:
            p.add_argument(flag, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, set up logging to stderr, run the stage; input errors exit with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, _, func_name = COMMANDS[args.command][0].partition(":")
    func = getattr(importlib.import_module(f"nnqc_pipe.{module}"), func_name)
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "log_level")}
    try:
        func(**kwargs)
    except ValueError as exc:
        logging.getLogger("nnqc_pipe").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
