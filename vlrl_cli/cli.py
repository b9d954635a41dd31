"""The `vlrl` command line. Thin: each command parses its flags and calls one library function.

Heavy packages (torch, transformers, datasets) are imported inside commands, so `vlrl --help` is instant.
Human output and progress go to stderr; `--json FILE` (or `-` for stdout) writes what machines read.
Exit codes: 0 ok; 1 the data or run failed a check, or an internal error (its traceback goes to a file
the message names); 2 bad usage or input (errors.UserError: one line naming the file, row, field or
flag); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .model.families import FAMILIES

app = typer.Typer(
    name="vlrl",
    help="Reinforcement learning for vision-language models: prepare, validate, train, eval, check-drift.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
if not err.is_terminal:  # logs and pipes: rich would assume 80 columns and truncate tables
    err.width = 150


def _a_path(text: str | Path) -> Path:
    """Every path flag and argument: an empty value (an unset shell variable, `--out "$DIR"`) would otherwise be
    read as "." and write into, or read from, the working folder."""
    if isinstance(text, Path):  # a default value, already a path
        return text
    if not text.strip():
        raise typer.BadParameter("an empty path (an unset shell variable?); name a file or folder")
    return Path(text)


def fail(message: str, code: int = 2) -> None:
    err.print("[bold red]error:[/] " + _escape(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def check_engine_name(engine: str) -> None:
    from .rollout.engines import require_vllm

    if engine not in ("hf", "vllm"):
        fail(f"--engine must be hf or vllm, not {engine!r}")
    if engine == "vllm":
        require_vllm()


# where an unexpected error's traceback is written: a command that has a run or output folder sets it
crash_dir: Path | None = None


def guarded(command):
    """Exit codes for a command: UserError -> 2 with its message; Ctrl-C -> 130; any other exception is a
    failure of the run, not of the usage -> 1, with the traceback in <crash_dir or a temp dir>/vlrl-error-*.log."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        import click

        from .errors import UserError, environment_problem

        global crash_dir, _json_stdout
        crash_dir = None
        try:
            real_stdout = sys.stdout.fileno() == 1
        except (AttributeError, OSError, ValueError):  # an in-process runner's stand-in (tests)
            real_stdout = False
        if kwargs.get("json_out") == "-" and real_stdout:
            sys.stdout.flush()
            _json_stdout = os.dup(1)
            os.dup2(2, 1)
        try:
            return command(*args, **kwargs)
        except (typer.Exit, click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130)
        except (Exception, SystemExit) as e:  # sys.exit() deep in a library or a user's code is no clean end either
            why = environment_problem(e)
            if why is not None:
                fail(why)  # the user's machine (a full disk, no permission), not a bug: no error log to write
            where = crash_dir if crash_dir is not None and crash_dir.is_dir() else Path(tempfile.gettempdir())
            fd, path = tempfile.mkstemp(prefix="vlrl-error-", suffix=".log", dir=where)
            with open(fd, "w") as f:
                f.write(f"vlrl {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
            first = (str(e).strip().splitlines() or [""])[0][:300]
            if lost_a_peer(e):
                # another rank stopped first (killed, out of memory, its own error): this rank's failure is only
                # the echo; that rank's message is the one that says why
                err.print(f"[bold red]error:[/] rank {os.environ.get('RANK', '?')} lost contact with another rank of "
                          f"this run, which stopped first; its own message says why ({type(e).__name__}; traceback "
                          f"in {path})", highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            err.print("[bold red]internal error:[/] " + _escape(f"{type(e).__name__}: {first}"), highlight=False, soft_wrap=True)
            err.print(f"the traceback is in {path}; please include it when you report this", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        finally:
            if _json_stdout is not None:
                sys.stdout.flush()
                os.dup2(_json_stdout, 1)
                os.close(_json_stdout)
                _json_stdout = None

    return run


def lost_a_peer(e: BaseException) -> bool:
    """Whether a multi-process run's exception is a collective failing because another rank went away (gloo's
    "Connection closed by peer", NCCL's "remote process exited", a reset TCP store)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "remote process exited", "DistNetworkError"))


# `--json -`: while the command runs, file descriptor 1 points at stderr, so whatever libraries print
# (DeepSpeed's logger, op builds, warnings) cannot mix into the JSON; the JSON goes to the saved stdout
_json_stdout: int | None = None


def write_json(target: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n"
    if target == "-":
        if _json_stdout is not None:
            os.write(_json_stdout, text.encode())
        else:
            sys.stdout.write(text)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)


def _run_with_progress(description: str, total: int | None, fn):
    """Run fn(progress_callback) under a progress bar on stderr (only when stderr is a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=err, disable=not err.is_terminal)
    with bar:
        task = bar.add_task(description, total=total)
        return fn(lambda n: bar.update(task, completed=n))


# --- prepare --------------------------------------------------------------------------------------

PREPARE_EPILOG = """[bold]Examples[/]

  vlrl prepare colors --out data/colors --rows 2000 --num-colors 4
  vlrl prepare geometry3k --path ../shared/data/geometry3k-sample --out data/geo
  vlrl prepare geometry3k --path hiyouga/geometry3k --out data/geo3k        (online)
  vlrl prepare maze2d --out data/maze --rows 5000 --val-rows 100 --maze-size 6
  vlrl prepare maze2d --out data/maze3 --maze-size 3 --min-moves 4 --max-steps 4 --reward progress
  vlrl prepare ./my_dataset --image-column image --question-column question --answer-column answer \\
      --env-class geometry3k --prompt-template "{question} Put the answer in \\\\boxed{}." --out data/mine
  vlrl prepare ./my_dataset --env-class corridor --env corridor=my_envs:Corridor --out data/mine
      (your environment by name: --env makes the name known and checks that it imports)
"""


@app.command(epilog=PREPARE_EPILOG)
@guarded
def prepare(
    source: Annotated[str, typer.Argument(help="geometry3k, colors, maze2d, or a dataset (folder, file, hub id).")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_a_path, help="Output folder.")],
    path: Annotated[Optional[str], typer.Option(help="Where a named source reads from (geometry3k).")] = None,
    split: Annotated[str, typer.Option(help="auto, source, or ratios like train=0.9,val=0.1.")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="At most N rows per source split.", min=1)] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits and synthetic data.")] = 0,
    min_pixels: Annotated[int, typer.Option(help="Smallest image area after resizing.", rich_help_panel="Images")] = 56 * 56,
    max_pixels: Annotated[int, typer.Option(help="Largest image area after resizing.", rich_help_panel="Images")] = 28 * 28 * 1280,
    factor: Annotated[int, typer.Option(help="Sides become multiples of this: the model's patch x merge (28 Qwen2/2.5-VL, 32 Qwen3-VL and "
                                        "Qwen3.5; Gemma 4 rescales every image itself, so any). `vlrl validate --processor` "
                                        "warns about images the model would resize.",
                                        rich_help_panel="Images")] = 28,
    image_format: Annotated[str, typer.Option(help="png (lossless) or jpeg.", rich_help_panel="Images")] = "png",
    jpeg_quality: Annotated[int, typer.Option(min=1, max=100, rich_help_panel="Images")] = 95,
    workers: Annotated[int, typer.Option(help="Worker processes (0: cores, at most 4).", min=0)] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier prepare's outputs in --out.")] = False,
    rows: Annotated[Optional[int], typer.Option(help="Rows to generate (colors; maze2d: training rows) [default: 1000].", rich_help_panel="colors / maze2d")] = None,
    num_colors: Annotated[Optional[int], typer.Option(help="colors: how many colours [default: 4].", rich_help_panel="colors / maze2d")] = None,
    shapes: Annotated[Optional[str], typer.Option(help="colors: comma list of circle,square,triangle [default: all].", rich_help_panel="colors / maze2d")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="colors: side of generated images [default: 56].", rich_help_panel="colors / maze2d")] = None,
    val_rows: Annotated[Optional[int], typer.Option(help="Validation rows besides --rows (maze2d: fixed seeds) [default: maze2d 50; colors: 10% of --rows by --split].", rich_help_panel="colors / maze2d")] = None,
    maze_size: Annotated[Optional[int], typer.Option(help="maze2d [default: 5].", rich_help_panel="colors / maze2d")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="maze2d: moves allowed [default: 20].", rich_help_panel="colors / maze2d")] = None,
    cell_px: Annotated[Optional[int], typer.Option(help="maze2d: pixels per maze cell (images are size x cell_px) [default: 28].", rich_help_panel="colors / maze2d")] = None,
    variant: Annotated[Optional[str], typer.Option(help="maze2d: hard (one route) or easy (some inner walls opened) [default: hard].", rich_help_panel="colors / maze2d")] = None,
    min_moves: Annotated[Optional[int], typer.Option(help="maze2d: keep mazes whose shortest route has at least this many moves.", rich_help_panel="colors / maze2d")] = None,
    max_moves: Annotated[Optional[int], typer.Option(help="maze2d: ... and at most this many.", rich_help_panel="colors / maze2d")] = None,
    reward: Annotated[Optional[str], typer.Option(help="maze2d: goal (1 at the goal, else 0) or progress (the share of the route covered) [default: goal].", rich_help_panel="colors / maze2d")] = None,
    image_column: Annotated[Optional[str], typer.Option(rich_help_panel="Any dataset")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Stable row ids (default: an `id` column when there is one); "
                                                     "splits are a hash of the id", rich_help_panel="Any dataset")] = None,
    question_column: Annotated[Optional[str], typer.Option(rich_help_panel="Any dataset")] = None,
    answer_column: Annotated[Optional[str], typer.Option(rich_help_panel="Any dataset")] = None,
    env_class: Annotated[Optional[str], typer.Option(help="The environment that scores the rows: a built-in name, "
                                                     "a name given by --env, or an import path module:Class.",
                                                     rich_help_panel="Any dataset")] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="Your environment: NAME=module:Class (repeatable); "
                                                     "NAME becomes a valid --env-class.", rich_help_panel="Any dataset")] = None,
    prompt_template: Annotated[Optional[str], typer.Option(help="Text with a {question} placeholder.",
                                                           rich_help_panel="Any dataset")] = None,
    data_source: Annotated[Optional[str], typer.Option(rich_help_panel="Any dataset")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the manifest here (- for stdout).")] = None,
) -> None:
    """Build parquet datasets whose prompts carry images as base64 data URIs.

    Every input row ends up in an output split or in rejects.jsonl with its reason; manifest.json records
    the options, counts, image statistics and a sha256 of every output. The same seed gives byte-identical files.
    """
    import os

    check_outputs({"--out": out}, {})
    check_outputs({"--json": json_out}, {"SOURCE": source, "--path": path})  # the manifest never over the data
    from .data.images import CanonicalSpec
    from .data.prepare import PrepareOptions
    from .data.prepare import prepare as run_prepare
    from .rollout.envs import env_registry

    if image_format not in ("png", "jpeg"):
        fail(f"--image-format must be png or jpeg, not {image_format!r}")
    known = frozenset(env_registry()) | frozenset(user_envs(env))
    if env_class and ":" in env_class and env_class not in known:
        from .errors import UserError
        from .rollout.envs import load_env_class

        try:  # an import path is imported now: a typo is said before any row is written, not by validate later
            load_env_class(env_class, env_class)
        except UserError as e:
            fail(f"--env-class: {e}")
    source_opts = {k: v for k, v in dict(
        rows=rows, num_colors=num_colors, shapes=[s.strip() for s in shapes.split(",") if s.strip()] if shapes else None,
        image_size=image_size, val_rows=val_rows, maze_size=maze_size, max_steps=max_steps, cell_px=cell_px,
        variant=variant, min_moves=min_moves, max_moves=max_moves, reward=reward,
        image_column=image_column, id_column=id_column, question_column=question_column, answer_column=answer_column,
        env_class=env_class, prompt_template=prompt_template, data_source=data_source).items() if v is not None}
    opts = PrepareOptions(
        source=source, out=out, path=path, split=split, limit=limit, seed=seed, overwrite=overwrite,
        workers=workers or min(4, os.cpu_count() or 1),
        spec=CanonicalSpec(factor=factor, min_pixels=min_pixels, max_pixels=max_pixels, image_format=image_format,
                           jpeg_quality=jpeg_quality),
        source_opts=source_opts, env_classes=known)
    result = _run_with_progress(f"prepare {source}", None, lambda cb: run_prepare(opts, progress=cb))
    err.print(f"[bold]prepare {source}[/] -> {out}")
    table = Table()
    table.add_column("split")
    table.add_column("rows", justify="right")
    for name, n in result.rows_out.items():
        table.add_row(name, str(n))
    table.add_row("[red]rejected[/]", str(result.rejected))
    err.print(table)
    img = result.manifest["images"]
    if img.get("count"):
        err.print(f"images: {img['count']} ({img['format']}), mean {img['width']['mean']}x{img['height']['mean']} px, "
                  f"{img['bytes_total'] / 1e6:.1f} MB")
    err.print(f"in = out + rejected: {result.rows_in} = {sum(result.rows_out.values())} + {result.rejected}")
    method = result.manifest["split_method"]
    err.print(("[yellow]splits: " if "position" in method else "splits: ") + _escape(method) + ("[/]" if "position" in method else ""),
              highlight=False)
    if result.rejected:
        err.print(f"[yellow]{result.rejected} rows rejected; reasons in {out / 'rejects.jsonl'}[/]")
    maze = result.manifest.get("summary") if source == "maze2d" else None
    if maze:
        err.print(f"mazes ({maze['variant']}): shortest routes (moves: rows) val {maze['val']['shortest_moves']}, "
                  f"train {maze['train']['shortest_moves']}; layouts val {maze['val']['distinct_layouts']}, train "
                  f"{maze['train']['distinct_layouts']}, {maze['val_layouts_seen_in_train']} of the val layouts also in train")
        err.print(f"a blind policy (the best fixed move sequence) solves {'' if maze['blind_policy_exact'] else '>= '}"
                  f"{maze['blind_policy_val_success']:.3f} of the val mazes", highlight=False)
    if json_out:
        write_json(json_out, result.manifest)


# --- validate -------------------------------------------------------------------------------------

VALIDATE_EPILOG = """[bold]Examples[/]

  vlrl validate data/geo/train.parquet data/geo/val.parquet
  vlrl validate data/geo/*.parquet --processor Qwen/Qwen2.5-VL-3B-Instruct --max-prompt-tokens 2048
  vlrl validate my.jsonl --max-images 4 --json report.json --write-clean clean.jsonl
  vlrl validate data/mine/train.parquet --env corridor=my_envs:Corridor   (rows naming your environment)

Exit status: 0 no errors, 1 errors found, 2 a file cannot be read at all.
"""


@app.command(epilog=VALIDATE_EPILOG)
@guarded
def validate(
    paths: Annotated[list[Path], typer.Argument(parser=_a_path, help="Record files: .parquet, .jsonl or .json.")],
    processor: Annotated[Optional[str], typer.Option(help="Model dir or hub id: count prompt tokens exactly.")] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(help="Error above this many prompt tokens (needs --processor).")] = None,
    max_images: Annotated[Optional[int], typer.Option(help="Error above this many images in a prompt.")] = None,
    allow_remote: Annotated[bool, typer.Option(help="Remote image URLs are warnings, not errors (still never fetched).")] = False,
    env_class: Annotated[Optional[list[str]], typer.Option(help="Extra accepted env_class names, not checked (repeatable).")] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="Your environment: NAME=module:Class (repeatable), "
                                                     "imported now; rows may name it.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes (0: cores, at most 4).", min=0)] = 0,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the report here (- for stdout).")] = None,
    write_clean: Annotated[Optional[Path], typer.Option(parser=_a_path, help="Write the rows without errors here (folder for several inputs).")] = None,
    show: Annotated[int, typer.Option(help="Problems listed one by one (the table groups them all).")] = 20,
) -> None:
    """Check records against the schema, decode every image, count prompt tokens exactly."""
    import os

    from .tools.validate import ValidateOptions, total_rows, validate_paths
    from .tools.validate import write_clean as do_write_clean

    if max_prompt_tokens is not None and not processor:
        fail("--max-prompt-tokens needs --processor (token counts depend on the model's chat template and image grid)")
    check_outputs({"--json": json_out, "--write-clean": write_clean}, {f"PATH {p}": p for p in paths},
                  folders=("--write-clean",))
    opts = ValidateOptions(processor=processor, max_prompt_tokens=max_prompt_tokens, max_images=max_images,
                           allow_remote=allow_remote, env_classes=(*(env_class or ()), *user_envs(env)),
                           workers=workers or min(4, os.cpu_count() or 1))
    total = total_rows(paths)
    report = _run_with_progress("validate", total, lambda cb: validate_paths(paths, opts, progress=cb))

    if report.problems:
        err.print("[bold]problems by kind[/]")
        table = Table()
        for col in ("code", "severity", "count", "rows (file:row)", "example"):
            table.add_column(col, overflow="fold")
        for (code, severity), n in sorted(report.by_code().items()):
            these = [p for p in report.problems if p.code == code and p.severity == severity]
            rows = ", ".join(f"{Path(p.file).name}:{p.row}" for p in these[:8]) + (f" +{n - 8} more" if n > 8 else "")
            color = "red" if severity == "error" else "yellow"
            table.add_row(code, f"[{color}]{severity}[/]", str(n), rows, these[0].message[:120])
        err.print(table)
        for p in report.problems[:show]:
            err.print(f"{p.file}:{p.row}: {p.severity} [{p.code}] {p.message}", highlight=False, markup=False)
        if len(report.problems) > show:
            err.print(f"... {len(report.problems) - show} more (--show N, or --json FILE for all)")
    bad = sum(len(v) for v in report.bad_rows.values())
    status = "[green]ok[/]" if not report.errors else "[red]errors[/]"
    err.print(f"{status}: {report.rows} rows in {len(report.files)} file(s), {report.errors} errors "
              f"({bad} rows), {report.warnings} warnings")
    if json_out:
        write_json(json_out, report.to_json())
    if write_clean:
        for dest, n in do_write_clean(report, write_clean).items():
            err.print(f"wrote {n} clean rows to {dest}")
    raise typer.Exit(1 if report.errors else 0)


# --- tiny-model -----------------------------------------------------------------------------------


@app.command("tiny-model", epilog="[bold]Examples[/]\n\n  vlrl tiny-model models/tiny --family qwen2_5_vl\n\n"
                                   "  vlrl tiny-model models/tiny-gemma --family gemma4")
@guarded
def tiny_model(
    out: Annotated[Path, typer.Argument(parser=_a_path, help="Folder to write the model to.")],
    family: Annotated[str, typer.Option(help=f"A supported family: {', '.join(FAMILIES)}.")] = "qwen2_5_vl",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace what OUT holds.")] = False,
) -> None:
    """Build a random few-MB VLM of a real architecture (any supported family), offline (tests, demos, smoke tests)."""
    from .model.tiny import FAMILIES, build_tiny_model

    given, family = family, family.lower().replace("-", "_")  # also Gemma4, Qwen2_5_VL, qwen2-5-vl
    if family not in FAMILIES:
        fail(f"--family must be one of {', '.join(FAMILIES)}, not {given!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite or not out.is_dir():
            fail(f"{out} already exists{' and is not a folder' if not out.is_dir() else ' and is not empty'}"
                 f"{'; pass --overwrite to replace it' if out.is_dir() else ''}")
        import shutil

        shutil.rmtree(out)
    path = build_tiny_model(out, family=family, seed=seed)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    err.print(f"wrote a tiny {family} model to {path} ({size / 1e6:.1f} MB)")


# --- serve ----------------------------------------------------------------------------------------

SERVE_EPILOG = """[bold]Examples[/]

  vlrl serve Qwen/Qwen3-VL-2B-Instruct --engine vllm --api-key tml-mykey
  vlrl serve models/tiny --port 8000 --state serve-state --name Qwen/Qwen3-VL-2B-Instruct

Then point a Tinker client at it: TINKER_API_KEY=tml-mykey, base_url=http://127.0.0.1:8000.
--name: extra names clients may use as base_model for this model (e.g. the hub id a recipe expects).
"""


@app.command(epilog=SERVE_EPILOG)
@guarded
def serve(
    model: Annotated[str, typer.Argument(help="Model dir or hub id to train and sample.")],
    engine: Annotated[str, typer.Option(help="Sampling engine: hf (anywhere) or vllm (GPU).")] = "hf",
    host: Annotated[str, typer.Option(help="Interface to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="VLRL_SERVE_API_KEY",
                       help="Key clients must send (Tinker's SDK wants it to start with tml-); default: a new random one, printed.")] = None,
    state: Annotated[Path, typer.Option(parser=_a_path, help="Folder for checkpoints and the SQLite state (kept across restarts).")] = Path("serve-state"),
    name: Annotated[Optional[list[str]], typer.Option("--name", help="Another base_model name that means MODEL (repeatable).")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(help="vllm engine: its share of the GPU.", min=0.05, max=0.95)] = 0.3,
    dtype: Annotated[Optional[str], typer.Option(help="Trainer and engine precision: bf16 or fp32 (default: bf16 on a GPU, fp32 on the CPU).")] = None,
) -> None:
    """Serve MODEL through the Tinker API: unmodified Tinker SDK clients and cookbook recipes train and sample on it."""
    import secrets

    from .serve import run_server

    check_engine_name(engine)
    if dtype not in (None, "bf16", "fp32"):
        fail(f"--dtype must be bf16 or fp32, not {dtype!r}")
    check_port_free(host, port)  # before minutes of model loading, not after
    if api_key is None:
        api_key = f"tml-{secrets.token_urlsafe(24)}"
        err.print(f"API key (clients send it as TINKER_API_KEY): [bold]{api_key}[/]")
    elif len(api_key) < 8:
        fail("--api-key is too short (8 characters at least)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]listening on {host}: anyone who can reach it and has the key can train and sample[/]")
    run_server(model, state, host=host, port=port, api_key=api_key, engine=engine, served_names=tuple(name or ()),
               gpu_memory_utilization=gpu_memory_utilization,
               dtype={"bf16": "bfloat16", "fp32": "float32", None: None}[dtype], log=lambda m: err.print(m, markup=False, highlight=False))


def check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        fail(f"--host {host}: {e.strerror}")
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            s.bind(addr)
        except OSError as e:
            fail(f"--port {port}: {host}:{port} is not free ({e.strerror}); another server is using it, or pick "
                 "another port")


# --- train ----------------------------------------------------------------------------------------

TRAIN_EPILOG = """[bold]Examples[/]

  vlrl train recipes/colors-tiny.yaml
  vlrl train recipes/geometry3k.yaml --set trainer.lr=1e-6 --set rollout.n=8 --gpus 8
  vlrl train recipes/colors-tiny.yaml --resume          (continue from the last checkpoint)
  vlrl train recipes/geometry3k-7b-lora.yaml --plan     (GPU memory per phase, what fits; no training)
  vlrl train my_recipe.yaml --env corridor=my_envs:Corridor   (your environment, from a module here)

Writes runs/<run.name>/: recipe.yaml, metrics.jsonl, checkpoints/step_N/{hf,ds}.
"""


@app.command(epilog=TRAIN_EPILOG)
@guarded
def train(
    recipe: Annotated[Path, typer.Argument(parser=_a_path, help="A recipe YAML (see recipes/).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: section.key=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run's latest checkpoint, same data order and RNG.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run in the same run directory (its metrics and checkpoints).")] = False,
    allow_changes: Annotated[bool, typer.Option(help="With --resume: accept a recipe that differs from the run's.")] = False,
    gpus: Annotated[int, typer.Option(help="GPUs on this machine; > 1 relaunches through the DeepSpeed launcher.")] = 1,
    nprocs: Annotated[int, typer.Option(help="Ranks on the CPU (gloo), through the DeepSpeed launcher; for tests.")] = 1,
    hostfile: Annotated[Optional[Path], typer.Option(parser=_a_path, help="DeepSpeed hostfile for several machines.")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the final metrics here (- for stdout).")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the GPU memory this recipe needs per phase and what fits; train nothing.")] = False,
    gpu: Annotated[Optional[str], typer.Option(help="With --plan: plan for this GPU (H100-80GB, 8xH200-141GB, ...) instead of this machine's or the recipe's trainer.sized_for.")] = None,
    ignore_plan: Annotated[bool, typer.Option(help="Start even when the memory plan says the recipe does not fit this GPU.")] = False,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="Your environment: NAME=module:Class (repeatable); adds to the recipe's envs:.")] = None,
) -> None:
    """SFT and GRPO-family RL with DeepSpeed ZeRO and a colocated rollout engine."""
    from .train.recipe import load_recipe

    import os

    from .train.runs import claim_run_dir

    global crash_dir
    check_outputs({"--json": json_out}, {"RECIPE": recipe})
    from .rollout.envs import importable_from, parse_env_flags

    # --env NAME=module:Class is the recipe's envs: entry (and travels to every rank as an override)
    overrides = list(set_ or []) + [f"envs.{name}={target}" for name, target in parse_env_flags(env).items()]

    importable_from(Path.cwd(), recipe.parent)  # user environment modules next to the recipe, or here
    if plan:
        from .train.plan import plan_for, render_plan

        p = plan_for(load_recipe(recipe, overrides, check_paths=False), gpu, gpus if gpus > 1 else None)
        err.print(render_plan(p), highlight=False, soft_wrap=True, markup=False)
        if json_out:
            write_json(json_out, p.to_json())
        return
    rec = load_recipe(recipe, overrides)
    if not os.environ.get("VLRL_RUN_CLAIMED") and not ignore_plan:
        check_fits(rec, gpus)
    if rec.rollout.engine_ranks and not hostfile and not os.environ.get("VLRL_RUN_CLAIMED"):
        from .train.rollout_ranks import check_placement

        check_placement(rec.rollout.engine_ranks, max(gpus, nprocs))  # before any rank starts or the run is claimed
    if not os.environ.get("VLRL_RUN_CLAIMED"):  # a rank relaunched below: the parent already decided
        done = claim_run_dir(rec, resume, overwrite, allow_changes)
        if done:
            err.print(done, highlight=False)
            if json_out:  # what --json promises, also when there was nothing left to do
                from .train.runs import read_metrics

                last = (read_metrics(rec.run_dir) or [{}])[-1]
                write_json(json_out, {"run_dir": str(rec.run_dir), "finished": True, **last})
            return
        if rec.rollout.engine == "vllm" and rec.algorithm.name == "grpo":
            from .rollout.engines import require_vllm

            require_vllm()
        from .tools.validate import check_run_data

        # every row through validate's checks, once, before any rank loads a model
        check_run_data([rec.data.train, rec.data.val], tuple(rec.envs))
    from .train.runs import after_interrupt

    if gpus > 1 or nprocs > 1 or hostfile:
        from .train.launch import relaunch

        os.environ["VLRL_RUN_CLAIMED"] = "1"  # the ranks inherit it
        try:
            code = relaunch(recipe, overrides, resume, gpus=gpus, nprocs=nprocs, hostfile=hostfile)
        except KeyboardInterrupt:
            err.print(after_interrupt(rec.run_dir, recipe, overrides), highlight=False, soft_wrap=True)
            raise
        raise typer.Exit(code)
    from .train.launch import run_training

    rec.run_dir.mkdir(parents=True, exist_ok=True)
    crash_dir = rec.run_dir  # a crash's traceback goes next to the run's metrics
    try:
        final = run_training(rec, resume=resume, console=err)
    except KeyboardInterrupt:
        if not os.environ.get("RANK") or os.environ.get("RANK") == "0":
            err.print(after_interrupt(rec.run_dir, recipe, overrides), highlight=False, soft_wrap=True)
        raise
    if json_out:
        write_json(json_out, final)


def check_fits(rec, gpus: int) -> None:
    """On a GPU, refuse a recipe whose memory plan does not fit, before any model loads."""
    import torch

    if not torch.cuda.is_available():
        return
    from .errors import UserError
    from .train.plan import plan_for, render_plan

    try:
        p = plan_for(rec, None, gpus)
    except UserError:  # the config cannot be read here: loading the model will say why
        return
    if not p.fits:
        raise UserError(render_plan(p) + "\n(--ignore-plan starts anyway)")


# --- eval -----------------------------------------------------------------------------------------


@app.command("eval", epilog="[bold]Examples[/]\n\n  vlrl eval runs/colors-grpo/checkpoints/step_60/hf demo-out/colors/val.parquet --out evals/colors\n"
                            "  vlrl eval Qwen/Qwen2.5-VL-3B-Instruct data/geo3k/test.parquet --engine vllm --n 8 --temperature 1.0 --out evals/geo")
@guarded
def eval_(
    model: Annotated[str, typer.Argument(help="Hub id, model dir, checkpoint (runs/x/checkpoints/step_N) or run dir (its latest).")],
    data: Annotated[Path, typer.Argument(parser=_a_path, help="Records (.parquet / .jsonl).")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_a_path, help="Output folder.")],
    engine: Annotated[str, typer.Option(help="hf or vllm.")] = "hf",
    n: Annotated[int, typer.Option(help="Samples per record (pass@k for every k <= n); n > 1 needs --temperature > 0.", min=1)] = 1,
    temperature: Annotated[float, typer.Option(help="0 = greedy (one answer per record); pass@k: 1.0.", min=0)] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    max_turns: Annotated[Optional[int], typer.Option(help="Turns per episode [default: what the environment allows, "
                                                     "e.g. a maze's move limit].", min=1)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N records.", min=1)] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="Your environment: NAME=module:Class (repeatable), "
                                                     "as a recipe's envs: say; installed ones are found by themselves, and a run "
                                                     "directory's own from its recipe.yaml.")] = None,
    history_images: Annotated[Optional[int], typer.Option(help="Keep the last K images of a multi-turn episode in the "
                                                          "context (rollout.history.max_images) [default: all].", min=1)] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the metrics here (- for stdout).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous eval's files in --out.")] = False,
) -> None:
    """Evaluation rollouts in the training environments: metrics.json (accuracy, pass@k), rollouts.jsonl, report.html."""
    from .rollout.engines import Sampling
    from .tools.evaluate import EvalOptions, run_eval
    from .data.records import count_rows

    global crash_dir
    check_engine_name(engine)
    check_finite({"--temperature": temperature})
    if n > 1 and temperature == 0:
        fail(f"--n {n} with greedy decoding (--temperature 0) would give {n} identical answers per record: pass "
             "--temperature 1.0 to sample them (pass@k), or --n 1")
    envs = run_envs(model, env)
    opts = EvalOptions(engine=engine, n=n, sampling=Sampling(temperature, top_p, max_new_tokens, seed),
                       max_turns=max_turns, limit=limit, max_images=history_images)
    total = count_rows(data)
    total = min(total, limit) if total and limit else total
    model_dir = check_model_argument(model)  # a typo or an unreachable hub: said now, before anything is created
    check_outputs({"--json": json_out, "--out": out}, {"DATA": data, "MODEL": model_dir})
    check_eval_out(out, overwrite)
    from .tools.validate import check_run_data

    # every row eval reads through validate's checks, before any model loads
    check_run_data([str(data)], tuple(envs), verb="run", limit=limit)
    from .train.runs import lock_run_dir, resolve_checkpoint

    ckpt = resolve_checkpoint(model)
    if ckpt is not None:  # which step a run directory stands for, said before minutes of work
        err.print(f"model: {ckpt}", highlight=False)
    lock_run_dir(out, "vlrl eval", "give this eval another --out")  # two evals into one folder: the second stops
    crash_dir = out
    metrics = _run_with_progress("eval", total, lambda cb: run_eval(model, str(data), out, opts, env_registry=envs,
                                                                    progress=cb))
    table = Table()
    for col in ("records", "samples", "accuracy", "reward_mean", "format_rate", f"pass@{n}"):
        table.add_column(col, justify="right")
    table.add_row(str(metrics["records"]), str(metrics["samples"]), f"{metrics['accuracy']:.3f}",
                  f"{metrics['reward_mean']:.3f}", f"{metrics['format_rate']:.3f}", f"{metrics['pass_at_k'][str(n)]:.3f}")
    err.print(table)
    if metrics["env_errors"]:
        err.print(f"[yellow]{metrics['env_errors']} of {metrics['samples']} samples ended in an error of their "
                  "environment and are scored as failed; each says why in rollouts.jsonl (env_error)[/]", highlight=False)
    err.print(f"wrote {out / 'metrics.json'}, {out / 'rollouts.jsonl'} and {out / 'report.html'}")
    if json_out:
        write_json(json_out, metrics)


def check_eval_out(out: Path, overwrite: bool) -> None:
    """--out of eval: absent, empty, or a previous eval's folder (replaced only with --overwrite)."""
    from .tools.evaluate import EVAL_FILES

    if out.exists() and not out.is_dir():
        fail(f"--out {out}: a file, not a folder")
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in EVAL_FILES and p.name != ".lock")
    if others:
        fail(f"--out {out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
             "give eval a folder of its own")
    if any((out / name).exists() for name in EVAL_FILES) and not overwrite:
        fail(f"--out {out} holds a previous eval; pass --overwrite to replace it, or another --out")


def check_outputs(outputs: dict[str, object], inputs: dict[str, object], folders: tuple[str, ...] = ("--out",)) -> None:
    """Every output path can be written, before any work: not a path under a file, not a read-only folder, not a
    folder where a file goes (`folders` names the flags that take a folder). No output flag may name one of the
    command's inputs (or a folder inside it): that would overwrite the data or write into the model."""
    resolved = {name: Path(str(p)).resolve() for name, p in inputs.items() if p and Path(str(p)).exists()}
    for flag, value in outputs.items():
        if not value or str(value) == "-":
            continue
        target = Path(str(value)).resolve()
        if target.is_dir() and flag not in folders:
            fail(f"{flag} {value} is a folder: name a file")
        existing = next(p for p in (target, *target.parents) if p.exists())
        if existing != target and not existing.is_dir():
            fail(f"{flag} {value}: {existing} is a file, so nothing can be written under it")
        if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
            fail(f"{flag} {value}: {existing if existing.is_dir() else existing.parent} is not writable")
        for name, source in resolved.items():
            if target == source or (source.is_dir() and source in target.parents):
                fail(f"{flag} {value} would write into {name} {source}: choose another path")


def check_finite(values: dict[str, float | None]) -> None:
    """inf and nan pass a flag's min/max bounds; they are refused here, naming the flag."""
    import math

    for flag, v in values.items():
        if v is not None and not math.isfinite(v):
            fail(f"{flag} {v}: needs a finite number")


def user_envs(flags: list[str] | None) -> dict[str, str]:
    """--env NAME=module:Class flags, imported now (from here, PYTHONPATH or installed packages)."""
    from .rollout.envs import check_envs, importable_from, parse_env_flags

    importable_from(Path.cwd())
    envs = parse_env_flags(flags)
    check_envs(envs)
    return envs


def run_envs(model: str, flags: list[str] | None) -> dict[str, str]:
    """user_envs(flags) over the environments a run's recipe registered (`envs:` of its saved recipe.yaml), when
    MODEL is a run directory or one of its checkpoints: `vlrl eval runs/x DATA` plays the run's own
    environments without naming them again. A flag of the same name wins."""
    import yaml

    from .errors import UserError
    from .train.runs import resolve_checkpoint

    given = user_envs(flags)
    saved = {}
    path = Path(model)
    # a run directory, one of its checkpoints, or a checkpoint's hf/ folder (runs/x/checkpoints/step_N/hf)
    ckpt = resolve_checkpoint(str(path.parent) if path.name == "hf" and path.parent.parent.name == "checkpoints"
                              else model)
    recipe = ckpt.parent.parent / "recipe.yaml" if ckpt is not None else None
    if recipe is not None and recipe.is_file():
        try:
            envs = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("envs") or {}
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as e:
            fail(f"{recipe}: cannot read the run's environments ({type(e).__name__}); name them with --env")
        saved = {str(k): str(v) for k, v in envs.items() if str(k) not in given} if isinstance(envs, dict) else {}
    if saved:
        from .rollout.envs import check_envs, importable_from

        importable_from(Path.cwd())
        try:
            check_envs(saved)
        except UserError as e:
            fail(f"{recipe} registers an environment that cannot be imported from here: {e} (run from the folder "
                 "the run was started in, or name it with --env NAME=module:Class)")
    return {**saved, **given}


def check_model_argument(model: str) -> str:
    """MODEL of eval / check-drift: a run or checkpoint folder, a model folder, or a hub id that can be had.
    Returns the folder that holds the model (a run directory's latest checkpoint), which outputs must not touch."""
    from .model.loading import check_model_name
    from .train.runs import resolve_checkpoint

    ckpt = resolve_checkpoint(model)
    if ckpt is None:
        check_model_name(model)
    return str(ckpt or model)


# --- check-drift ----------------------------------------------------------------------------------

DRIFT_EPILOG = """[bold]Examples[/]

  vlrl check-drift runs/colors-grpo/checkpoints/step_100/hf data/colors/val.parquet --engine hf --samples 16
  vlrl check-drift Qwen/Qwen2.5-VL-3B-Instruct data/geo3k/test.parquet --engine vllm --train-dtype bf16 \\
      --zero-stage 3 --after-update --max-mean 0.02 --max-abs 0.5 --json drift.json --plot drift.png
  vlrl check-drift Qwen/Qwen3-VL-4B-Instruct data/geo3k/test.parquet --engine vllm --train-dtype bf16 \
      --zero-stage 2 --after-update      # on a GPU the trainer's blocks are compiled, as in vlrl train

Exit code: 1 when --max-mean / --max-abs are exceeded or an agreement check (prompt ids, image tensors,
image-token counts, seen images after an update) fails; 0 otherwise. Sampling-setting flags are warnings.
"""

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


@app.command("check-drift", epilog=DRIFT_EPILOG)
@guarded
def check_drift_cmd(
    model: Annotated[str, typer.Argument(help="Hub id, model dir, checkpoint (runs/x/checkpoints/step_N) or run dir (its latest).")],
    data: Annotated[Path, typer.Argument(parser=_a_path, help="Records (.parquet / .jsonl).")],
    engine: Annotated[str, typer.Option(help="hf or vllm.")] = "hf",
    train_dtype: Annotated[str, typer.Option(help="Trainer precision: bf16 or fp32.")] = "fp32",
    engine_dtype: Annotated[Optional[str], typer.Option(help="Engine precision (default: the trainer's).")] = None,
    zero_stage: Annotated[Optional[int], typer.Option(help="Wrap the trainer in DeepSpeed ZeRO-S (0-3).", min=0, max=3)] = None,
    lora_rank: Annotated[int, typer.Option(help="Check a LoRA policy of this rank (merged weights to the engine; "
                                                "--after-update changes the adapters).", min=0)] = 0,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Compile the trainer's blocks. Default: "
                                                   "as `vlrl train` (model.compile: auto), i.e. on a GPU with ZeRO 0-2.")] = None,
    pack_tokens: Annotated[int, typer.Option(help="Score packed rows of at most this many tokens, as trainer.pack_tokens "
                                                  "trains (0: padded micro-batches).", min=0)] = 0,
    samples: Annotated[int, typer.Option(help="Records to roll out (one sample each).", min=1)] = 16,
    temperature: Annotated[float, typer.Option(min=0)] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 = off.", min=0)] = 0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    max_turns: Annotated[Optional[int], typer.Option(help="Turns per episode [default: what the environment allows].", min=1)] = None,
    after_update: Annotated[bool, typer.Option(help="Apply a known weight change through the sync path; re-check seen and unseen images.")] = False,
    update_from: Annotated[Optional[str], typer.Option(help="With --after-update: load this checkpoint instead of perturbing.")] = None,
    perturb: Annotated[Optional[float], typer.Option(help="With --after-update: relative noise per tensor [default: 0.1].",
                                                     min=0, max=10)] = None,
    max_mean: Annotated[Optional[float], typer.Option(help="Fail (exit 1) when mean |delta logprob| exceeds this.", min=0)] = None,
    max_abs: Annotated[Optional[float], typer.Option(help="Fail (exit 1) when max |delta logprob| exceeds this.", min=0)] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="Your environment: NAME=module:Class (repeatable); "
                                                     "a run directory's own come from its recipe.yaml.")] = None,
    history_images: Annotated[Optional[int], typer.Option(help="Keep the last K images of a multi-turn episode in the "
                                                          "context, as rollout.history.max_images [default: all].", min=1)] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the whole report here (- for stdout).")] = None,
    plot: Annotated[Optional[Path], typer.Option(parser=_a_path, help="Write a PNG: histogram of deltas, delta vs token position.")] = None,
) -> None:
    """Diff the inference engine's log-probs against the training forward, and say why they differ."""
    from .tools.drift import DriftOptions, check_drift, finite, write_plot
    from .rollout.engines import Sampling

    check_engine_name(engine)
    model_dir = check_model_argument(model)
    check_outputs({"--json": json_out, "--plot": plot}, {"DATA": data, "MODEL": model_dir})
    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        fail(f"--plot {plot}: name a .png (or .pdf, .svg) file")
    if (update_from is not None or perturb is not None) and not after_update:
        fail("--update-from and --perturb change the weights of --after-update; pass --after-update too")
    check_finite({"--temperature": temperature, "--perturb": perturb, "--max-mean": max_mean, "--max-abs": max_abs})
    perturb = 0.1 if perturb is None else perturb
    dtypes = [DTYPES.get(x) for x in (train_dtype, engine_dtype or train_dtype)]
    if None in dtypes:
        fail(f"--train-dtype / --engine-dtype: use one of {', '.join(DTYPES)}")
    opts = DriftOptions(engine=engine, train_dtype=dtypes[0], engine_dtype=dtypes[1], zero_stage=zero_stage, lora_rank=lora_rank,
                        compile="auto" if compile is None else compile, samples=samples, sampling=Sampling(temperature, top_p, max_new_tokens, seed, top_k),
                        max_turns=max_turns, after_update=after_update, update_from=update_from, perturb=perturb,
                        max_mean=max_mean, max_abs=max_abs, pack_tokens=pack_tokens, envs=run_envs(model, env),
                        max_images=history_images)
    from .tools.validate import check_run_data

    # validate's checks on every row check-drift reads, before any model loads
    check_run_data([str(data)], tuple(opts.envs), verb="run", limit=samples * (2 if after_update else 1))
    with err.status("check-drift") as status:
        report = check_drift(model, str(data), opts, progress=lambda msg: status.update(f"check-drift: {msg}"))
    print_drift(report)
    if json_out:
        write_json(json_out, finite(report))
    if plot:
        write_plot(report, plot)
        err.print(f"wrote {plot}")
    raise typer.Exit(0 if report["passed"] else 1)


def print_drift(report: dict) -> None:
    def fmt(x):
        return "-" if x is None else f"{x:.3g}"

    table = Table(title="|trainer - engine| log-prob of sampled tokens (all figures: --json)")
    for col in ("split", "tokens", "mean", "p90", "p99", "max", "k3 KL", "IS ratio"):
        table.add_column(col, justify="right" if col != "split" else "left", no_wrap=True)
    phases = [("", report["stats"])] + [(f"updated, {k}: ", v) for k, v in report.get("after_update", {}).items()
                                       if k in ("seen", "unseen")]
    for prefix, stats in phases:
        rows = [("overall", stats["overall"])] + [(name, s) for key in ("by_prompt_kind", "by_turn", "by_position")
                                                  for name, s in stats[key].items()]
        for name, s in rows:
            if not s.get("tokens"):
                continue
            a, r = s["abs_diff"], s["is_ratio"]
            table.add_row(prefix + name.replace("_", " "), str(s["tokens"]), fmt(a["mean"]), fmt(a["p90"]),
                          fmt(a["p99"]), fmt(a["max"]), fmt(s["k3_kl"]), f"{fmt(r['min'])}-{fmt(r['max'])}")
    err.print(table)
    checks = Table(title="agreement checks")
    for col in ("check", "result", "detail"):
        checks.add_column(col, overflow="fold")
    for c in report["checks"]:
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]" if c["severity"] == "error" else "[yellow]warn[/]",
                None: "[dim]n/a[/]"}[c["passed"]]
        checks.add_row(c["name"], mark, c["detail"] + (f"\n[bold]fix:[/] {c['fix']}" if c["fix"] and not c["passed"] else ""))
    err.print(checks)
    worst = report["worst_tokens"][:5]
    if worst:
        err.print("[bold]worst tokens[/]")
        for w in worst:
            err.print(f"  {w['record_id']} turn {w['turn']} pos {w['position']}: {w['token']!r} engine {w['engine_logprob']:.4f} "
                      f"trainer {w['trainer_logprob']:.4f} (|d| {w['abs_diff']:.3g}) after ...{w['context'][-60:]!r}",
                      highlight=False, markup=False)
    err.print("[green]passed[/]" if report["passed"] else "[red]failed[/]")


# --- export ---------------------------------------------------------------------------------------

EXPORT_EPILOG = """[bold]Examples[/]

  vlrl export runs/geo3k-7b-lora                      (its latest checkpoint)
  vlrl export runs/geo3k-7b-lora/checkpoints/step_50 --out models/geo3k-step50
  vlrl export runs/geo3k-7b-lora --out models/geo3k-step50 --overwrite   (replaces that earlier export)

A LoRA run keeps adapters in its checkpoints and writes the merged model only at the end; this merges any
checkpoint's adapter into the base model it was trained on (transformers' format, loadable by vLLM).
`vlrl eval` and `check-drift` do it themselves when given an adapter checkpoint.
"""


@app.command(epilog=EXPORT_EPILOG)
@guarded
def export(
    checkpoint: Annotated[str, typer.Argument(help="A run directory (its latest checkpoint) or a checkpoint.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", parser=_a_path, help="Write the model here instead of the checkpoint's hf/ (a new or empty folder).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export at --out (never another kind of folder).")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write {\"model\": path} here (- for stdout).")] = None,
) -> None:
    """Write a checkpoint's model in transformers' format (a LoRA adapter merged into its base model)."""
    from .train.runs import export_checkpoint, resolve_checkpoint

    check_outputs({"--json": json_out, "--out": out}, {})
    ckpt = resolve_checkpoint(checkpoint)
    if ckpt is None:
        fail(f"{checkpoint}: not a run directory or a checkpoint (runs/NAME or runs/NAME/checkpoints/step_N)")
    with err.status("export") as status:
        path = export_checkpoint(ckpt, out, progress=lambda msg: status.update(f"export: {msg}"), overwrite=overwrite)
    err.print(f"model: {path}", highlight=False)
    if json_out:
        write_json(json_out, {"model": str(path)})


def main() -> None:
    app()
