"""Recipes: YAML files validated by schemas/recipe.schema.json, overridden with `--set key=value`.

A recipe becomes nested dataclasses (`Recipe`), so code reads `recipe.rollout.n`, not dict lookups.
The schema (additionalProperties: false everywhere) is what rejects unknown keys and wrong types, with
the key named; the dataclass defaults are the values a key takes when the recipe leaves it out.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass
class LoraCfg:
    rank: int = 0  # 0: no LoRA (a full fine-tune); a recipe's model.lora section needs rank >= 1
    alpha: float = 32.0  # scale = alpha / rank
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the language model's attention + MLP projections
    vision: bool = False  # also the vision tower's and the projector's projections (lora.py)


@dataclass
class ModelCfg:
    path: str = ""  # hub id or local dir (a tiny model: `vlrl tiny-model`)
    dtype: str = "float32"  # training weights: float32 | bfloat16
    gradient_checkpointing: bool = False
    # torch.compile each transformer block (model.loading.compile_layers): fuses the elementwise work around the
    # matmuls; ZeRO 0-2 only. The first step of a run pays the compilation (about a minute on a GPU).
    # auto: on when training on a GPU with ZeRO 0-2 (policy.compile_wanted); never on the CPU, where a tiny
    # model gains nothing and would wait for the compiler
    compile: bool | str = "auto"
    # the trainer's vision tower encodes each distinct image of a forward once (model.image_sharing.share_repeated_images:
    # a GRPO group's samples repeat their prompt image). auto: on where a GPU is present (load_vlm)
    share_images: bool | str = "auto"
    attention: str = "auto"  # trainer / hf engine: auto (sdpa, vision batched) | a transformers attn_implementation
    lora: LoraCfg = field(default_factory=LoraCfg)  # adapters only (lora.py); rank 0 = full fine-tune


@dataclass
class DataCfg:
    train: str = ""
    val: str | None = None
    max_prompt_tokens: int = 2048  # longer prompts are not rolled out (metrics: prompts_too_long)
    val_limit: int = 64  # validation prompts evaluated at each eval


@dataclass
class HistoryCfg:
    """How much of a multi-turn episode's past the context keeps (both sides see the same context)."""

    max_images: int | None = None  # the last this many images stay; older ones become a short text stand-in


@dataclass
class RolloutCfg:
    engine: str = "hf"  # hf | vllm
    n: int = 8  # samples per prompt (the GRPO group)
    prompts_per_step: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_turns: int | None = None  # None: as many as the environment allows (a maze's move limit; 1 single-turn)
    max_context_tokens: int = 4096  # multi-turn: an episode stops (done_reason=context_full) past this
    gpu_memory_utilization: float = 0.3  # vllm
    eval_temperature: float = 0.0  # greedy
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks: fixed-length rollouts)
    history: HistoryCfg = field(default_factory=HistoryCfg)  # a bounded image history (rollout/episodes.py)
    # the last engine_ranks ranks only generate, the others only train (train/rollout_ranks.py); 0: colocated
    engine_ranks: int = 0
    max_staleness: int = 0  # engine_ranks: rollouts from weights at most this many updates old

    def sampling(self, seed: int, evaluation: bool = False):
        """The engines' Sampling for training rollouts, or for validation (eval_temperature, no ignore_eos)."""
        from ..rollout.engines import Sampling

        if evaluation:
            return Sampling(self.eval_temperature, 1.0, self.max_new_tokens, seed)
        return Sampling(self.temperature, self.top_p, self.max_new_tokens, seed, ignore_eos=self.ignore_eos)


@dataclass
class AlgorithmCfg:
    name: str = "grpo"  # grpo | sft
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    adv_std_norm: bool = True  # divide by the group std (off: Dr. GRPO)
    kl_coef: float = 0.0  # k3 KL to a frozen reference; 0 = no reference model
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    mismatch: str = "tis"  # none | tis (truncated importance weights) | mask (drop sequences)
    mismatch_cap: float = 2.0  # tis: weight cap; mask: drop a sequence whose ratio leaves [1/cap, cap]
    ppo_epochs: int = 1
    sft_target: str = "reference"  # sft: reference | ground_truth | random_choice (see sft.py)


@dataclass
class TrainerCfg:
    steps: int = 100
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | linear (decays to 10% of lr at the last step)
    micro_batch: int = 8  # sequences per forward/backward
    # > 0: instead, sequences packed end to end into micro-batches of at most this many tokens (no padding,
    # no attention across sequences; batches.make_batch). 0: micro_batch sequences, right-padded
    pack_tokens: int = 0
    grad_clip: float = 1.0
    zero_stage: int = 0
    offload: bool = False  # ZeRO CPU offload of optimizer state
    # bf16 training: accumulate the micro-batches' gradients in fp32 (DeepSpeed's BF16_Optimizer; ZeRO-1, no
    # offload). Off: DeepSpeed's default, bf16 .grad tensors, where a micro-batch's gradient smaller than
    # 1/256 of the running sum is rounded away (tests/test_train.py). Costs 4 bytes per trained parameter.
    grad_accum_fp32: bool = False
    # ZeRO-3: parameters smaller than this stay whole on every rank; None = all of them on one rank,
    # DeepSpeed's 100k on several (training.persistence_for); 0 partitions every one (tests on tiny
    # models). Each partitioned parameter costs a fetch per forward / recompute / backward of every micro-batch.
    zero3_persistence_threshold: int | None = None
    seed: int = 0
    save_every: int = 0  # steps; 0 = only at the end
    save_final: bool = True  # off for benchmarks: a 3B checkpoint with optimizer state is ~50 GB
    eval_every: int = 0  # steps; 0 = never during training
    # end the run at the first validation whose accuracy reaches this (a GRPO run with data.val and eval_every):
    # that step's checkpoint, a LoRA run's merged export included, is the run's last. None: every step runs
    stop_at_val_accuracy: float | None = None
    sized_for: str = "H100-80GB"  # the GPU this recipe is sized for (plan.GPUS); `vlrl train --plan` checks it


@dataclass
class RunCfg:
    name: str = "run"
    dir: str = "runs"
    tensorboard: bool = False
    wandb: bool = False


@dataclass
class Recipe:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    algorithm: AlgorithmCfg = field(default_factory=AlgorithmCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    run: RunCfg = field(default_factory=RunCfg)
    envs: dict[str, str] = field(default_factory=dict)  # extra env_class -> "module:Class"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict:
        """The resolved recipe as a valid recipe (what runs/<name>/recipe.yaml holds)."""
        d = asdict(self)
        if self.model.lora.rank == 0:  # no LoRA: the section is absent (a written one needs rank >= 1)
            del d["model"]["lora"]
        return d


class RecipeError(UserError):
    """A recipe file or --set override is wrong; the message names the key."""


def parse_value(text: str) -> Any:
    """A --set value: YAML scalars (1e-6, true, null, [1, 2]); anything else stays a string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def key_schema(schema: dict, parts: list[str]) -> dict | None:
    """The schema of one dotted key (None: no such key)."""
    node = schema
    for part in parts:
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    if t is None and "enum" in schema:
        return {type(v).__name__ for v in schema["enum"]}
    return set(t) if isinstance(t, list) else {t}


def coerce(value: Any, schema: dict | None) -> Any:
    """A value as its key's type when what was written means it: a number written as text (YAML 1.1 reads
    `1e-5` as a string), a whole number written as a float (`steps: 2.0`, `1e3`) for an integer key. Anything
    else is left for the schema to refuse, naming the key."""
    if schema is None or isinstance(value, bool):
        return value
    types = _types(schema)
    if isinstance(value, dict) and "properties" in schema:
        return {k: coerce(v, key_schema(schema, [k])) for k, v in value.items()}
    number = value
    if isinstance(value, str) and types & {"integer", "number"} and "string" not in types:
        try:
            number = float(value)
        except ValueError:
            return value
    if isinstance(number, float) and "integer" in types and "number" not in types:
        return int(number) if number.is_integer() else value
    if isinstance(number, (int, float)) and "number" in types:
        return number
    return value


def apply_overrides(data: dict, overrides: list[str], schema: dict | None = None) -> dict:
    """`--set key=value` items applied to a recipe's data. The value is read as YAML, except for a key whose
    type is text, which keeps exactly what was typed (`run.name=001` stays "001")."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. trainer.lr=1e-6")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {p} is not a section")
        target = key_schema(schema, parts) if schema else None
        text_only = target is not None and _types(target) <= {"string", "null"} and value not in ("null", "~")
        node[parts[-1]] = value if text_only else parse_value(value)
    return data


def _build(cls, data: dict):
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            kwargs[f.name] = _build(type(default), data[f.name]) if is_dataclass(default) else data[f.name]
    return cls(**kwargs)


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A copy of a loaded recipe with --set style changes (not re-validated: for what-if plans)."""
    return _build(Recipe, apply_overrides(recipe.to_dict(), overrides))


def did_you_mean(error) -> str:
    """For an unknown-key error: the known keys of that section closest to each unknown one (a typo's fix)."""
    known = list((error.schema.get("properties") or {}).keys())
    unknown = [k for k in error.instance if k not in known] if isinstance(error.instance, dict) else []
    hints = [f"{k!r} -> {m[0]!r}" for k in unknown if (m := difflib.get_close_matches(str(k), known, n=1, cutoff=0.6))]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


_KINDS = {"string": "a string", "object": "a mapping", "array": "a list", "integer": "an integer",
          "number": "a number", "boolean": "true or false"}


def _kind_of(value) -> str:
    """How a --set value was read (YAML rules), in words: `the integer 5`, `the string 'x'`."""
    kind = {bool: "the boolean", int: "the integer", float: "the number", str: "the string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    return kind if value is None or isinstance(value, (list, dict)) else f"{kind} {value!r}"


def load_recipe(path: str | Path | None, overrides: list[str] = (), base_dir: Path | None = None,
                check_paths: bool = True) -> Recipe:
    """Read, override, validate and type a recipe. Raises RecipeError naming the bad key.

    check_paths=False skips checking that the model and data exist (`--plan` needs neither)."""
    import jsonschema
    import yaml

    from ..data.records import load_schema

    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections (model, data, rollout, ...)")
    schema = load_schema("recipe")
    data = coerce(apply_overrides(data, list(overrides), schema), schema)
    typed = {item.partition("=")[0]: item for item in overrides}  # the user's own words, for messages
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            msg = e.message
            if e.validator == "additionalProperties":
                msg = msg.replace("Additional properties are not allowed", "unknown key") + did_you_mean(e)
            elif where in typed and e.validator == "type":  # what the typed value became, and what was wanted
                wanted = e.validator_value if isinstance(e.validator_value, str) else " or ".join(e.validator_value)
                msg = f"must be {_KINDS.get(wanted, wanted)}; --set {typed[where]} gives {_kind_of(e.instance)}"
            elif where in typed:  # say what was typed, not how YAML read it
                msg = msg.replace(repr(e.instance), repr(typed[where].partition("=")[2]), 1) + f" (--set {typed[where]})"
            lines.append(f"{where}: {msg}")
        raise RecipeError(f"{path or 'recipe'}: " + "; ".join(lines))
    recipe = _build(Recipe, data)
    where = path or "recipe"
    if not recipe.model.path:
        raise RecipeError(f"{where}: model.path is required")
    if not recipe.data.train:
        raise RecipeError(f"{where}: data.train is required")
    tr = recipe.trainer
    if tr.grad_accum_fp32 and (recipe.model.dtype != "bfloat16" or tr.zero_stage != 1 or tr.offload):
        raise RecipeError(f"{where}: trainer.grad_accum_fp32 needs model.dtype bfloat16, trainer.zero_stage 1 and no "
                          f"offload (DeepSpeed's fp32 accumulation; got {recipe.model.dtype}, stage {tr.zero_stage}"
                          f"{', offload' if tr.offload else ''})")
    if recipe.model.compile is True and recipe.trainer.zero_stage == 3:
        raise RecipeError(f"{where}: model.compile needs trainer.zero_stage 0, 1 or 2 (ZeRO-3 gathers each "
                          "block's parameters in module hooks that a compiled block skips)")
    check_rollout_settings(recipe, where)
    if not check_paths:
        return recipe
    from ..model.loading import check_model_name

    try:
        check_model_name(recipe.model.path)
    except UserError as e:
        raise RecipeError(f"{where}: model.path {e}") from None
    for key in ("train", "val"):
        p = getattr(recipe.data, key)
        if p and not Path(p).is_file():
            raise RecipeError(f"{where}: data.{key} {p} does not exist")
    check_model_length(recipe, where)
    if recipe.envs:  # the recipe's own environments, imported now: a typo is named before any model loads
        from ..rollout.envs import check_envs, importable_from

        # from Python as from the CLI: modules beside the recipe or in the current folder
        importable_from(Path.cwd(), *([path.parent] if path is not None else []))
        try:
            check_envs(recipe.envs)
        except UserError as e:
            raise RecipeError(f"{where}: envs: {e}") from None
    return recipe


def check_rollout_settings(recipe: Recipe, where) -> None:
    """Settings a GRPO run cannot train correctly with, refused before any work (RecipeError naming the keys)."""
    r, a = recipe.rollout, recipe.algorithm
    if r.max_staleness and not r.engine_ranks:
        raise RecipeError(f"{where}: rollout.max_staleness {r.max_staleness} needs rollout.engine_ranks >= 1: an engine "
                          "beside its trainer waits for every update (it sleeps while the trainer trains), so its "
                          "rollouts are never stale")
    if r.max_staleness and recipe.trainer.steps > 1 and r.max_staleness >= recipe.trainer.steps:
        raise RecipeError(f"{where}: rollout.max_staleness {r.max_staleness} is not below trainer.steps "
                          f"{recipe.trainer.steps}: the engine would generate every step with the starting weights and "
                          "never receive a trained one (1 or 2 is usual)")
    if r.engine_ranks and a.name != "grpo":
        raise RecipeError(f"{where}: rollout.engine_ranks is for GRPO; {a.name} generates nothing to put on ranks of "
                          "its own (set it to 0)")
    if r.engine_ranks and recipe.trainer.eval_every:
        raise RecipeError(f"{where}: trainer.eval_every with rollout.engine_ranks: validation during a run needs an "
                          "engine beside the trainer; set trainer.eval_every 0 and trainer.save_every N, then "
                          "`vlrl eval` the checkpoints (or train with rollout.engine_ranks 0)")
    target = recipe.trainer.stop_at_val_accuracy
    if target is not None and (a.name != "grpo" or not recipe.trainer.eval_every or not recipe.data.val):
        raise RecipeError(f"{where}: trainer.stop_at_val_accuracy {target} needs a GRPO run that validates: "
                          "data.val set and trainer.eval_every > 0 (the accuracy it stops on is measured there)")
    if a.name != "grpo":
        return
    if r.n < 2:
        raise RecipeError(f"{where}: rollout.n is {r.n}: GRPO's advantage compares a prompt's samples with each "
                          "other, and a group of one has none (every advantage is 0 and nothing trains); use n >= 2")
    if r.top_p < 1.0:
        raise RecipeError(f"{where}: rollout.top_p {r.top_p} truncates the distribution the engine samples from, "
                          "while the trainer scores the full softmax: the importance weights would be biased by "
                          "construction. Train with top_p 1.0 (truncation is fine for `vlrl eval`)")
    if multi_turn(recipe) and recipe.data.max_prompt_tokens + r.max_new_tokens > r.max_context_tokens:
        raise RecipeError(f"{where}: data.max_prompt_tokens ({recipe.data.max_prompt_tokens}) + rollout.max_new_tokens "
                          f"({r.max_new_tokens}) is over rollout.max_context_tokens ({r.max_context_tokens}): a "
                          "longest prompt could not take even its first turn")


def multi_turn(recipe: Recipe) -> bool:
    """Whether episodes may take more than one turn (max_turns unset: the environment decides, so yes)."""
    return recipe.rollout.max_turns is None or recipe.rollout.max_turns > 1


def episode_tokens(recipe: Recipe, turns: int | None = None) -> int:
    """The longest sequence an episode can reach: a prompt and its answer, or the context limit at which a
    multi-turn episode stops. turns: the episodes' turn limit (rollout.max_turns, else one turn, or what the
    records' environments allow when the caller knows)."""
    r = recipe.rollout
    turns = turns or r.max_turns or 1
    # a later turn adds its observation (images too) as well as its answer: the context limit bounds them all
    return r.max_context_tokens if turns > 1 else recipe.data.max_prompt_tokens + r.max_new_tokens


def check_model_length(recipe: Recipe, where) -> None:
    """An episode must fit the model's positions (vLLM refuses a longer max_model_len at start-up)."""
    from ..model.loading import check_supported, max_positions

    try:
        check_supported(recipe.model.path)
    except UserError as e:
        raise RecipeError(f"{where}: model.path {e}") from None
    limit = max_positions(recipe.model.path)
    need = max(episode_tokens(recipe), recipe.rollout.max_context_tokens if multi_turn(recipe) else 0)
    if limit is not None and need > limit:
        keys = "rollout.max_context_tokens" if multi_turn(recipe) else \
            "data.max_prompt_tokens + rollout.max_new_tokens"
        raise RecipeError(f"{where}: {keys} = {need} tokens, over the {limit} positions model {recipe.model.path} has")


def engine_limits(recipe: Recipe, records: list[dict]):
    """What the rollout engine must allow at start-up (engines.EngineLimits) for this recipe's episodes."""
    from ..rollout.episodes import engine_limits as limits

    from ..rollout.episodes import turn_limit

    turns = turn_limit(records, recipe.rollout.max_turns, recipe.envs)
    return limits(records, episode_tokens(recipe, turns), turns, recipe.envs, recipe.rollout.history.max_images)
