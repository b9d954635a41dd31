"""Rollouts: records -> environment episodes -> trajectories of token ids, masks and engine log-probs.

One trajectory is one token sequence: the rendered prompt, then for every turn the engine's generated
tokens (trained on; their engine log-probs kept) and the observation's tokens (masked out of the loss).
Images accumulate in the context: every observation image is rendered once and its tensors appended,
so the trainer scores exactly the ids and pixels the engine generated from. An episode whose context
would exceed `max_context_tokens` ends with done_reason "context_full".
"""

from __future__ import annotations

import dataclasses
import contextlib
import itertools
import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engines import EngineLimits, GenRequest, Generation, RolloutEngine, Sampling
from .envs import resolve_env
from .envs.base import is_count, is_time_limit
from ..model.render import RenderedPrompt, concat_image_inputs, render_prompt, render_text, split_messages
from ..errors import UserError


class EnvError(UserError):
    """An environment failed on one record: it raised, or returned what cannot be used. That record's episodes
    end with done_reason "env_error" and this message, and the run goes on without them (train does not train
    their group, eval scores them as failed); only where every episode of a step fails does the run stop."""


@dataclass
class Sequence:
    """One token sequence to score or train on, with its images: what every batch is built from (a rollout's
    trajectory, an SFT target, a serve datum; train/batches.make_batch)."""

    token_ids: list[int]
    loss_mask: list[int]  # 1 where the token is trained (generated tokens, SFT targets)
    engine_logp: list[float]  # the engine's log-probs of generated tokens (as it sampled them), 0 elsewhere
    tensors: dict[str, Any]  # per-image tensors of every image in the sequence, in order (render.image_inputs)

    @classmethod
    def untrained(cls, token_ids: list[int], tensors: dict) -> "Sequence":
        """A sequence to score only: no trained tokens, no engine log-probs."""
        return cls(list(token_ids), [0] * len(token_ids), [0.0] * len(token_ids), tensors)


@dataclass(kw_only=True)
class Trajectory(Sequence):
    """A rollout: the sequence of one episode (prompt, then each turn's generated and observation tokens) and
    what the environment said of it."""

    record_id: str
    group: int  # index of the prompt within the step: samples of one prompt share a group
    env_class: str
    data_source: str
    prompt_len: int
    reward: float = 0.0
    turns: int = 0
    done_reason: str = ""
    info: dict = field(default_factory=dict)
    texts: list[dict] = field(default_factory=list)  # per turn: response text, tokens, observation text
    images: list[str] = field(default_factory=list)  # data URIs of the episode's images, in order (for reports)
    end_images: list[str] = field(default_factory=list)  # the environment's last frame, shown in reports only
    # segments closed when the image history was cut (rollout.history): each is the context the engine saw for
    # the turns in it; this trajectory's own tokens are the last segment
    earlier: list[Sequence] = field(default_factory=list)

    def sequences(self) -> list[Sequence]:
        """The token sequences the trainer scores: each segment exactly as the engine saw it (one sequence unless
        the history was cut)."""
        return [*self.earlier, self]

    @property
    def response_len(self) -> int:
        return sum(sum(s.loss_mask) for s in self.sequences())


def _image_urls(messages: list[dict]) -> list[str]:
    return [p["image_url"]["url"] for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p.get("type") == "image_url"]


def _text_of(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        c = m["content"]
        parts += [c] if isinstance(c, str) else [p.get("text", "[image]") for p in c]
    return " ".join(parts)


STAND_IN = "[an earlier frame]"  # what an image older than the history keeps becomes


def keep_last_images(messages: list[dict], max_images: int | None) -> list[dict]:
    """The messages with every image but the last `max_images` replaced by a short text stand-in (None: all kept).
    Whole image parts go, never part of one: no placeholder is ever left without its image."""
    if max_images is None:
        return messages
    total = len(_image_urls(messages))
    drop, out = total - max_images, []
    for m in messages:
        if isinstance(m["content"], str) or drop <= 0:
            out.append(m)
            continue
        parts = []
        for part in m["content"]:
            if part.get("type") == "image_url" and drop > 0:
                parts.append({"type": "text", "text": STAND_IN})
                drop -= 1
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out


def _env_name(env_or_cls, method: str, record: dict) -> tuple[str, str]:
    cls = env_or_cls if isinstance(env_or_cls, type) else type(env_or_cls)
    return (f"environment {cls.__module__}:{cls.__qualname__}.{method}",
            f"(record {record.get('id', '?')!r}, env_class {record.get('env_class')!r})")


DEFAULT_TIME_LIMIT_S = 60.0  # an environment class that is not an Env subclass and sets no time_limit_s


class _NoReturn(Exception):
    """An environment call ran past its time limit."""


class _EnvThread:
    """A daemon thread that runs one caller's environment calls in turn, so a call that never returns (a
    deadlocked simulator, a user's infinite loop) can be abandoned: the run goes on with a fresh thread, and
    the abandoned one, a daemon, never holds up the process's exit. One per calling thread, so a call's time
    is its own, never spent queued behind another thread's calls (GRPO resets the next step's episodes on
    its render thread while the main thread steps this step's)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="vlrl-env", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            fn, box, done = self.jobs.get()
            try:
                box.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who names it
                box.append((False, e))
            done.set()

    def run(self, fn, limit: float):
        box, done = [], threading.Event()
        self.jobs.put((fn, box, done))
        if not done.wait(limit):
            raise _NoReturn
        ok, value = box[0]
        if not ok:
            raise value
        return value


_env_threads = threading.local()


def _bounded(fn, limit):
    """fn() on this thread's environment thread, given at most `limit` seconds (None: no limit, run here). An
    environment thread left behind by a call past its limit is replaced for the next call."""
    if limit is None:
        return fn()
    worker = getattr(_env_threads, "worker", None)
    if worker is None or not worker.thread.is_alive():  # none yet, or the parent's, which fork() did not copy
        worker = _env_threads.worker = _EnvThread()
    try:
        return worker.run(fn, float(limit))
    except _NoReturn:
        _env_threads.worker = None
        raise


def env_call(env, method: str, record: dict, *args):
    """env.reset / env.step (or the class itself: "__init__"), where an exception, a malformed result or a call
    that does not return within the environment's `time_limit_s` (an environment's own bug, often a user's) is
    an EnvError naming the class, the method and the record, not an internal error of vlrl, never a hang and
    never a NaN reward trained on."""
    name, where = _env_name(env, method, record)
    limit = getattr(env, "time_limit_s", DEFAULT_TIME_LIMIT_S)
    if not is_time_limit(limit):
        raise EnvError(f"{name}: time_limit_s = {str(limit)[:40]!r}; a number of seconds > 0 or None belongs {where}")
    try:
        call = (lambda: env(*args)) if method == "__init__" else (lambda: getattr(env, method)(*args))
        result = _bounded(call, limit)
    except _NoReturn:
        raise EnvError(f"{name} did not return within {limit:g} s (its time_limit_s) {where}") from None
    except EnvError:
        raise
    except UserError as e:  # the environment's own words (a record setting it refuses): still this record's failure
        raise EnvError(str(e)) from e
    except (Exception, SystemExit) as e:  # noqa: BLE001 - named and re-raised (sys.exit in an env ends its record only)
        # where in the environment's own code it failed: the one line a user needs to start debugging
        frames = traceback.extract_tb(e.__traceback__)
        at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        raise EnvError(f"{name} raised {type(e).__name__}: {one_line(str(e))}{at} {where}") from e
    problem = (_bad_messages(result) if method == "reset" else _bad_step(result) if method == "step" else None)
    if problem:
        raise EnvError(f"{name} returned {problem} {where}")
    return result


def one_line(text: str, limit: int = 300) -> str:
    """An environment's message as one printable line: it may quote model text (hostile input), whose newlines
    and terminal escape sequences must not reach the user's terminal as such."""
    import re

    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else text[:limit] + "..."


def _bad_messages(messages) -> str | None:
    """What is wrong with messages an environment returned (None: nothing): a list of chat messages, each a
    role and a content of text or parts."""
    if not isinstance(messages, list):
        return f"{type(messages).__name__} where a list of messages belongs"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"message {i} without a role ({str(m)[:60]!r})"
        content = m.get("content")
        if not isinstance(content, str) and not (isinstance(content, list) and all(isinstance(p, dict) for p in content)):
            return f"message {i} whose content is neither text nor a list of parts ({str(content)[:60]!r})"
    return None


def _bad_step(result) -> str | None:
    """What is wrong with a step's result (None: nothing): a StepResult with a finite number as its reward."""
    if not all(hasattr(result, k) for k in ("observation", "reward", "done", "info")):
        return f"{type(result).__name__} where a StepResult belongs"
    reward = result.reward
    try:  # numpy and torch scalars are numbers too (a gymnasium reward often is one); text and bools are not
        value = None if isinstance(reward, (str, bytes, bool)) or type(reward).__name__ == "bool_" else float(reward)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value):
        return f"reward {str(reward)[:40]!r}: a finite number is needed (a NaN would reach every weight)"
    result.reward = value  # a plain float from here on: metrics and reports write it as JSON
    if not isinstance(result.info, dict):
        return f"info of type {type(result.info).__name__}: a dict is needed"
    if result.info.get("correct") not in (None, True, False):
        return f"info['correct'] = {str(result.info['correct'])[:40]!r}: true, false or absent"
    if not isinstance(result.info.get("done_reason", ""), str):  # written to rollouts.jsonl and counted by kind
        return f"info['done_reason'] = {str(result.info['done_reason'])[:40]!r}: text or absent"
    return _bad_messages(result.observation)


@contextlib.contextmanager
def env_images(env, method: str, record: dict):
    """Rendering what an environment returned: an image it made that cannot be used (not an image, a 1000:1
    strip) is its bug, named with the environment and the record like any other."""
    from ..data.images import ImageError

    try:
        yield
    except ImageError as e:
        name, where = _env_name(env, method, record)
        raise EnvError(f"{name} returned an image that cannot be used: {e} {where}") from None


class Episode:
    """One environment episode and its growing token sequence.

    With a bounded image history (`max_images`), a new frame that would bring the context over the bound starts a
    new segment: the conversation is rendered again with its older frames replaced by a text stand-in, and from
    then on the engine generates from that context. The segment before keeps exactly the context its turns were
    generated from, so the trainer scores, turn by turn, what the engine saw."""

    def __init__(self, record: dict, group: int, processor, env_registry: dict | None, max_context: int,
                 first: tuple[list[dict], RenderedPrompt] | None = None, max_images: int | None = None):
        """first: (messages, rendered prompt) of another sample's reset of this record: reused (the prompt
        is rendered once for its n samples) when this reset returned the same messages."""
        self.env = env_call(resolve_env(record["env_class"], env_registry), "__init__", record)
        turns = getattr(self.env, "max_turns", None)  # an instance may set its own (per record)
        if not is_count(turns, 1):
            name, where = _env_name(self.env, "__init__", record)
            raise EnvError(f"{name} left max_turns = {str(turns)[:40]!r}; a whole number >= 1 belongs {where}")
        self.record, self.processor, self.max_context, self.max_images = record, processor, max_context, max_images
        # the reset sets the env's episode state
        messages = keep_last_images(env_call(self.env, "reset", record, record), max_images)
        with env_images(self.env, "reset", record):
            rendered = first[1] if first is not None and first[0] == messages else render_prompt(processor, messages)
        self.messages = [dict(m) for m in messages]  # the conversation as the engine sees it now
        self.traj = Trajectory(token_ids=list(rendered.input_ids), loss_mask=[0] * rendered.length,
                               engine_logp=[0.0] * rendered.length, tensors=rendered.tensors,
                               record_id=record.get("id", ""), group=group, env_class=record["env_class"],
                               data_source=record.get("data_source", ""), prompt_len=rendered.length,
                               images=_image_urls(self.messages))
        self.done = False
        self.eos_text = processor.tokenizer.eos_token

    @classmethod
    def failed(cls, record: dict, group: int, error: EnvError) -> "Episode":
        """An episode of a record whose environment failed before the first turn: done, nothing to generate from."""
        ep = cls.__new__(cls)
        ep.record, ep.env, ep.messages = record, None, []
        ep.traj = Trajectory(token_ids=[], loss_mask=[], engine_logp=[], tensors={}, record_id=str(record.get("id", "")),
                             group=group, env_class=str(record.get("env_class", "")),
                             data_source=str(record.get("data_source", "")), prompt_len=0)
        ep.fail(error)
        return ep

    def fail(self, error: EnvError) -> None:
        """End the episode on its environment's failure: no reward, the message kept with the trajectory."""
        self.done = True
        self.traj.done_reason, self.traj.reward, self.traj.info = "env_error", 0.0, {"env_error": str(error)}

    def request(self, n: int = 1) -> GenRequest:
        """The next turn's request: its answer may fill the context, never pass it (the trainer scores the
        whole sequence, and vLLM would refuse one over its model length)."""
        return GenRequest(self.traj.token_ids, self.traj.tensors, n, self.messages,
                          max_new_tokens=self.max_context - len(self.traj.token_ids))

    def observe(self, gen: Generation) -> None:
        """Append the generated turn, step the environment, append its observation tokens."""
        t = self.traj
        t.token_ids += gen.token_ids
        t.loss_mask += [1] * len(gen.token_ids)
        t.engine_logp += gen.logprobs
        text = self.processor.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        result = env_call(self.env, "step", self.record, text)
        t.turns += 1
        t.reward = result.reward
        t.info = result.info
        t.texts.append({"response": text, "tokens": len(gen.token_ids), "finish": gen.finish_reason,
                        "reward": result.reward, "observation": _text_of(result.observation),
                        "observation_images": len(_image_urls(result.observation))})
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        if result.done:  # a closing observation never enters the context; its frame is kept for the report
            self.done, t.done_reason = True, result.info.get("done_reason", "done")
            t.texts[-1]["observation_images"] = 0
            t.end_images = _image_urls(result.observation)
            return
        new_images = len(_image_urls(result.observation))
        if self.max_images is not None and len(_image_urls(self.messages)) + new_images > self.max_images:
            with env_images(self.env, "step", self.record):
                self._cut_history(result.observation)
            return
        with env_images(self.env, "step", self.record):
            ids, tensors = self._render_delta(result.observation, ended_with_eos=gen.finish_reason == "stop")
        if len(t.token_ids) + len(ids) >= self.max_context:
            self._context_full()
            return
        self.messages += result.observation
        t.images += _image_urls(result.observation)
        t.token_ids += ids
        t.loss_mask += [0] * len(ids)
        t.engine_logp += [0.0] * len(ids)
        t.tensors = concat_image_inputs([t.tensors, tensors])

    def _context_full(self) -> None:
        t = self.traj
        self.done, t.done_reason = True, "context_full"
        t.texts[-1].update(observation_images=0, observation_dropped=True)  # the model never saw it

    def _cut_history(self, observation: list[dict]) -> None:
        """Close the segment and start the next from the conversation with its older frames as stand-ins."""
        t = self.traj
        messages = keep_last_images(self.messages + observation, self.max_images)
        rendered = render_prompt(self.processor, messages)
        if rendered.length >= self.max_context:
            self._context_full()
            return
        t.earlier.append(Sequence(t.token_ids, t.loss_mask, t.engine_logp, t.tensors))
        t.token_ids, t.tensors = list(rendered.input_ids), rendered.tensors
        t.loss_mask, t.engine_logp = [0] * rendered.length, [0.0] * rendered.length
        t.images += _image_urls(observation)
        self.messages = messages

    def _render_delta(self, observation: list[dict], ended_with_eos: bool) -> tuple[list[int], dict]:
        """Token ids of what the chat template puts between the generated turn and the next generation.

        The template text of the conversation with the new observation must extend the text without it
        (true of Qwen-format templates); the delta after the assistant's end-of-turn token is rendered
        with the observation's images, so placeholders expand to the right counts.
        """
        before_msgs, _ = split_messages(self.messages)
        after_msgs, obs_images = split_messages(observation)
        before = self.processor.apply_chat_template(before_msgs, add_generation_prompt=False, tokenize=False)
        after = self.processor.apply_chat_template(before_msgs + after_msgs, add_generation_prompt=True, tokenize=False)
        if not after.startswith(before) or self.eos_text not in before:
            raise UserError("the chat template does not render multi-turn conversations as a prefix-extension; "
                               "multi-turn environments need a Qwen-format template")
        tail = before[before.rfind(self.eos_text) + len(self.eos_text):]  # e.g. the "\n" after <|im_end|>
        delta = ("" if ended_with_eos else self.eos_text) + tail + after[len(before):]
        return render_text(self.processor, delta, obs_images)


def start_episodes(records: list[dict], processor, n: int, max_context: int, env_registry: dict | None = None,
                   max_prompt: int | None = None, max_images: int | None = None) -> list[list[Episode]]:
    """n episodes per record, reset, with the prompt rendered once per record (images included). Needs no
    engine, so the GRPO loop builds the next step's episodes on another thread while the trainer runs.

    A prompt longer than `max_prompt` tokens is not generated from: its episodes end at once with
    done_reason "prompt_too_long" and no response (the trainer skips them; metrics count them). A record whose
    environment fails to start gets n episodes that end at once with done_reason "env_error" (EnvError).
    max_images: the image history's bound (Episode); None keeps every frame.
    """
    groups = []
    for g, record in enumerate(records):
        try:
            first = Episode(record, g, processor, env_registry, max_context, max_images=max_images)
            shared = (list(first.messages), RenderedPrompt(first.traj.token_ids, [], first.traj.tensors, 0, 0))
            eps = [first] + [Episode(record, g, processor, env_registry, max_context, shared, max_images)
                             for _ in range(n - 1)]
        except EnvError as e:  # this record's environment cannot start: its episodes say why, the others go on
            groups.append([Episode.failed(record, g, e) for _ in range(n)])
            continue
        if max_prompt is not None and eps[0].traj.prompt_len > max_prompt:
            for ep in eps:
                ep.done, ep.traj.done_reason = True, "prompt_too_long"
        groups.append(eps)
    return groups


def run_episodes(engine: RolloutEngine, groups: list[list[Episode]], sampling: Sampling, max_turns: int | None = None,
                 timings: dict | None = None) -> list[Trajectory]:
    """Every episode run to the end with the engine; returns their trajectories, grouped by record, in order.
    max_turns: at most this many turns an episode (None: as many as its environment allows).
    timings: if given, gets "engine_s", the seconds spent inside the engine's generate calls (the rest is
    environments, rewards and rendering observations)."""
    live = [eps for eps in groups if not eps[0].done]
    # first turn: the n samples of a prompt share it, so one request with n samples per record
    engine_s = 0.0

    def generate(requests, sampling):
        nonlocal engine_s
        t = time.perf_counter()
        out = engine.generate(requests, sampling)
        engine_s += time.perf_counter() - t
        return out

    def observe(ep: Episode, gen: Generation) -> None:
        try:
            ep.observe(gen)
        except EnvError as e:  # this episode's environment failed: it ends here, the others go on
            ep.fail(e)

    firsts = generate([eps[0].request(len(eps)) for eps in live], sampling) if live else []
    for eps, gens in zip(live, firsts):
        for ep, gen in zip(eps, gens):
            observe(ep, gen)
    # later turns: episodes have diverged; one request each, until every episode is done
    for turn in itertools.count(1) if max_turns is None else range(1, max_turns):
        active = [ep for eps in groups for ep in eps if not ep.done and ep.env.max_turns > turn]
        if not active:
            break
        s = dataclasses.replace(sampling, seed=sampling.seed + 7919 * turn)
        for ep, gens in zip(active, generate([ep.request(1) for ep in active], s)):
            observe(ep, gens[0])
    out = []
    for eps in groups:
        for ep in eps:
            if not ep.done:
                ep.traj.done_reason = "max_turns"
            out.append(ep.traj)
    if timings is not None:
        timings["engine_s"] = timings.get("engine_s", 0.0) + engine_s
    return out


def collect(engine: RolloutEngine, records: list[dict], processor, n: int, sampling: Sampling, max_turns: int | None,
            max_context: int, env_registry: dict | None = None, max_prompt: int | None = None,
            timings: dict | None = None, max_images: int | None = None) -> list[Trajectory]:
    """n episodes per record, run to the end (start_episodes, then run_episodes); returns trajectories grouped
    by record, in order."""
    groups = start_episodes(records, processor, n, max_context, env_registry, max_prompt, max_images)
    return run_episodes(engine, groups, sampling, max_turns, timings)


def turn_limit(records: list[dict], max_turns: int | None, env_registry: dict | None = None) -> int:
    """The most turns an episode of these records takes: `max_turns` when set, else what their environments
    allow (a maze's move limit; 1 for a single-turn task)."""
    if max_turns is not None:
        return max_turns
    return max((_turns_of(resolve_env(rec["env_class"], env_registry), rec) for rec in records if rec.get("env_class")),
               default=1)


def _turns_of(cls, record: dict) -> int:
    """An environment's turn_limit(record), its failure or a result that is not a count named like any other."""
    turns = env_call(cls, "turn_limit", record, record)
    if not is_count(turns, 1):
        name, where = _env_name(cls, "turn_limit", record)
        raise UserError(f"{name} returned {str(turns)[:40]!r} where a whole number of turns >= 1 belongs {where}")
    return turns


def engine_limits(records: list[dict], max_model_len: int, max_turns: int | None,
                  env_registry: dict | None = None, max_images: int | None = None) -> EngineLimits:
    """What an engine must allow at start-up for episodes of these records: sequences of `max_model_len`, and as
    many images as one episode's context can hold (the most of any prompt, then each later turn's observation
    images, as the records' environments declare them; at most the image history's bound)."""
    from ..data.records import image_urls

    turns = turn_limit(records, max_turns, env_registry)
    prompt_images = max((len(image_urls(rec)) for rec in records), default=0)
    classes = {rec.get("env_class") for rec in records if rec.get("env_class")}
    per_turn = max((resolve_env(c, env_registry).observation_images for c in classes), default=0)
    images = prompt_images + per_turn * (turns - 1)
    return EngineLimits(max_model_len=max_model_len, max_images=images if max_images is None else min(images, max_images))
