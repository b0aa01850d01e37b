"""The ``nnqc-pipe`` command line: one sub-command per workflow rule (called by the rules), plus ``check`` and
``export-model``.

The stage sub-commands are built from the entry functions of :mod:`nnqc_pipe.stages`: each parameter becomes an
option ``--name-with-dashes`` whose type comes from the type hint and whose help comes from the function's
``Args:`` docstring section, so each option is declared once, in the function. Conversions:

- ``list[T]``: one or more values (``nargs="+"``), each converted to ``T``;
- ``dict[...]``: a JSON object (a rule passes a config section as is; ``dict[int, ...]`` keys become ints);
- ``T | None``: ``none`` (or an empty string) gives None;
- ``Literal[...]``: one of the listed choices;
- a parameter without a default is required.

Stage modules import torch only inside their network functions, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from nnqc_pipe import __version__
from nnqc_pipe.stages import STAGES


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text in ("", "none", "None") else convert(text)

    return parse


def _json_object(key_type: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = json.loads(text)
        return {key_type(k): v for k, v in value.items()} if key_type is int else value

    return parse


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(hint without ``None``, whether ``None`` was allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        allowed_none = len(args) < len(typing.get_args(hint))
        # str | os.PathLike is a path: a string on the command line.
        return (args[0] if len(args) == 1 else str), allowed_none
    return hint, False


def option_kwargs(hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for a parameter with type hint ``hint`` (see the module docstring)."""
    hint, allows_none = _unwrap_optional(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        item, _ = _unwrap_optional(args[0])
        return {"nargs": "+", "type": item if item in (int, float) else str}
    if origin is dict or hint is dict:
        convert = _json_object(args[0] if args else str)
    elif origin is typing.Literal:
        return {"choices": list(args)}
    elif hint in (int, float):
        convert = hint
    elif hint is bool:
        convert = _parse_bool
    else:
        convert = str
    return {"type": _optional(convert) if allows_none else convert}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parameter_help(func: Callable[..., Any]) -> dict[str, str]:
    """Parameter name -> help text from the ``Args:`` section of ``func``'s docstring."""
    doc = inspect.getdoc(func) or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    helps: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name = match.group(1)
            helps[name] = match.group(2).strip()
        elif name and line.startswith("        "):
            helps[name] += " " + line.strip()
        elif line.strip():
            break
    return helps


def add_function_command(sub: argparse._SubParsersAction, name: str, func: Callable[..., Any]) -> None:
    """A sub-command ``name`` whose options are ``func``'s parameters."""
    doc = inspect.getdoc(func) or ""
    summary = doc.split("\n\n", 1)[0].replace("\n", " ")
    parser = sub.add_parser(name, help=summary, description=doc.split("Args:", 1)[0].strip())
    hints = typing.get_type_hints(func)
    helps = parameter_help(func)
    for param in inspect.signature(func).parameters.values():
        kwargs = option_kwargs(hints[param.name])
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
        missing = f"(undocumented parameter of {func.__module__}.{func.__name__})"
        text = helps.get(param.name, missing)
        if param.default is not inspect.Parameter.empty:
            text += f" (default: {param.default})"
        parser.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name, help=text, **kwargs)


def stage_functions() -> dict[str, Callable[..., Any]]:
    """Sub-command name (rule name with dashes) -> stage entry function."""
    out = {}
    for module_name, names in STAGES.items():
        module = importlib.import_module(f"nnqc_pipe.stages.{module_name}")
        for name in names:
            out[name.replace("_", "-")] = getattr(module, name)
    return out


def add_check_command(sub: argparse._SubParsersAction) -> None:
    """``check``: QC of one image and mask with a trained model folder, outside Snakemake."""
    p = sub.add_parser("check", help="predicted quality of one mask for one image, with a trained model folder",
                       description="Preprocess one image with the model's plan, generate its pGT and print the "
                                   "predicted metrics of the mask.")
    p.add_argument("--image", required=True, help="the image (NIfTI)")
    p.add_argument("--mask", required=True, help="the candidate mask to QC, on the image's grid (NIfTI)")
    p.add_argument("--model-dir", required=True, help="folder with vae.pt and ldm.pt (results/<cohort>/models)")
    p.add_argument("--out", default=None, help="write the pGT here (NIfTI; default: not written)")
    p.add_argument("--plan", default=None, help="plan.json (default: next to or above --model-dir)")
    p.add_argument("--ddim-steps", type=int, default=None,
                   help="DDIM steps (default: the model's preset, e.g. 1 for cpu, 20 for paper)")
    p.add_argument("--samples", type=int, default=1, help="pGT draws per slice (default: 1)")
    p.add_argument("--start-strength", type=float, default=1.0,
                   help="1 = start from pure noise (the paper), < 1 = from the noised candidate (default: 1)")
    p.add_argument("--image-guidance", type=float, default=1.0,
                   help="guidance on the image, for models trained with ldm.image_dropout (default: 1 = off)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


def add_export_model_command(sub: argparse._SubParsersAction) -> None:
    """``export-model``: a cohort's trained QC model as a self-describing bundle folder (nnqc_pipe.models.bundle)."""
    p = sub.add_parser("export-model", help="write a cohort's trained QC model as a reusable bundle folder",
                       description="Copy a cohort's trained networks, model card, plan and fingerprint into a new "
                                   "folder with bundle.json (training cohort, modality, label names, vision expert "
                                   "identity, validation figures) and a SHA-256 MANIFEST. Another cohort uses it "
                                   "with the config key qc_model: OUT.")
    p.add_argument("results_dir", help="the trained cohort's results folder (results/<cohort>)")
    p.add_argument("out", help="the bundle folder to write (must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder OUT")
    p.add_argument("--expert-checkpoint", default=None,
                   help="current location of the vision expert checkpoint when it moved since training (its "
                        "weights must be the ones the model was trained with; default: the model card's path)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="nnqc-pipe", description="nnqc-pipe: segmentation QC with nnQC. "
                                     "The stage commands are called by the workflow's rules.")
    parser.add_argument("--version", action="version", version=f"nnqc-pipe {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in stage_functions().items():
        add_function_command(sub, name, func)
    add_check_command(sub)
    add_export_model_command(sub)
    return parser


def resolve_command(command: str) -> Callable[..., Any]:
    """The function a sub-command runs."""
    if command == "check":
        from nnqc_pipe.qc.check import check

        return check
    if command == "export-model":
        from nnqc_pipe.stages.models import export_model

        return export_model
    return stage_functions()[command]


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, set up logging to stderr, run the stage; input errors exit with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "log_level")}
    try:
        if "device" in kwargs:
            check_device(kwargs["device"])
        resolve_command(args.command)(**kwargs)
    except ValueError as exc:
        logging.getLogger("nnqc_pipe").error("%s", exc)
        return 2
    return 0


def check_device(device: str) -> None:
    """Resolve a network command's ``--device`` before it reads anything, so a GPU job on a host without CUDA fails
    at once with the message of :func:`nnqc_pipe.models.device.resolve_device` (torch is imported here only)."""
    from nnqc_pipe.models.device import DeviceUnavailableError, resolve_device

    try:
        resolve_device(device)
    except DeviceUnavailableError as exc:
        raise ValueError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
