"""report.html for `vlrl eval`: one self-contained page to look at rollouts.

Every trajectory's images (inline data URIs, no request leaves the page: a Content-Security-Policy forbids
it) and turns, its reward and correctness, a summary table, and a filter (all / correct / incorrect; also
from the URL: report.html#incorrect). Multi-turn episodes (maze2d) show their frames in order.
Model text is hostile input: everything is HTML-escaped, and only `data:image/...` URIs become images.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

from ..data.records import ground_truths

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2433;background:#f7f8fa}
h1{font-size:20px;margin:0 0 4px} .muted{color:#667} table{border-collapse:collapse;margin:12px 0;background:#fff}
td,th{border:1px solid #dde;padding:4px 10px;text-align:right} th:first-child,td:first-child{text-align:left}
.filters{margin:14px 0;position:sticky;top:0;background:#f7f8fa;padding:6px 0}
.filters button{margin-right:6px;padding:5px 12px;border:1px solid #99a;border-radius:14px;background:#fff;cursor:pointer}
.filters button.on{background:#1d2433;color:#fff}
.record{background:#fff;border:1px solid #dde;border-radius:8px;margin:12px 0;padding:12px}
.record h2{font-size:15px;margin:0 0 6px} .prompt{white-space:pre-wrap;margin:6px 0}
.sample{border-left:4px solid #aab;margin:10px 0;padding:4px 10px} .sample.ok{border-color:#2a9d4b} .sample.bad{border-color:#d04040}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff}
.badge.ok{background:#2a9d4b} .badge.bad{background:#d04040}
.turn{margin:6px 0} .response{white-space:pre-wrap;background:#f2f4f8;padding:6px;border-radius:4px;font-family:ui-monospace,monospace;font-size:12.5px}
.obs{white-space:pre-wrap;color:#445;margin:4px 0}
.frames{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-end} figure{margin:0} figcaption{font-size:11px;color:#667;text-align:center}
img{max-width:260px;max-height:260px;image-rendering:pixelated;border:1px solid #ccd}
[hidden]{display:none!important}
"""

# Filter by correctness; the URL hash (#correct / #incorrect) selects one on load. After the images have
# loaded, the body records how many decoded (used by the headless-browser test, handy when debugging).
SCRIPT = """
function show(which){
  document.querySelectorAll('.filters button').forEach(b=>b.classList.toggle('on',b.dataset.f===which));
  document.querySelectorAll('.sample').forEach(s=>{s.hidden=!(which==='all'||s.dataset.correct===(which==='correct'?'1':'0'))});
  document.querySelectorAll('.record').forEach(r=>{r.hidden=!r.querySelector('.sample:not([hidden])')});
  document.body.dataset.filter=which;
}
document.querySelectorAll('.filters button').forEach(b=>b.addEventListener('click',()=>{history.replaceState(null,'','#'+b.dataset.f);show(b.dataset.f)}));
show(['correct','incorrect'].includes(location.hash.slice(1))?location.hash.slice(1):'all');
window.addEventListener('load',()=>{
  const imgs=[...document.images];
  document.body.dataset.imagesOk=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;
  document.body.dataset.imagesBroken=imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length;
});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _img(url: str, caption: str) -> str:
    if not url.startswith("data:image/"):  # never a remote fetch, never a script URL
        return "<figure><figcaption>[image not shown: not an inline image]</figcaption></figure>"
    return f'<figure><img src="{_e(url)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _summary_rows(metrics: dict) -> str:
    ks = sorted(metrics.get("pass_at_k", {}), key=int)
    head = "".join(f"<th>{h}</th>" for h in ["", "records", "samples", "accuracy", "reward", "format", "turns"]
                   + [f"pass@{k}" for k in ks])

    def row(name: str, m: dict) -> str:
        cells = [m["records"], m["samples"], f'{m["accuracy"]:.3f}', f'{m["reward_mean"]:.3f}', f'{m["format_rate"]:.3f}',
                 f'{m["turns_mean"]:.2f}'] + [f'{m["pass_at_k"].get(k, 0):.3f}' for k in ks]
        return f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"

    rows = [row("all", metrics)]
    for key in ("data_source", "env_class"):
        rows += [row(f"{key}: {name}", m) for name, m in metrics.get(f"by_{key}", {}).items()]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _prompt_text(record: dict) -> str:
    parts = []
    for m in record.get("prompt", []):
        c = m["content"]
        parts += [c] if isinstance(c, str) else [p.get("text", "") for p in c if p.get("type") == "text"]
    return "\n".join(p for p in parts if p)


def _prompt_images(t) -> list[str]:
    """The trajectory's images that came with the prompt (the rest are observations, in turn order)."""
    return t.images[:len(t.images) - sum(x.get("observation_images", 0) for x in t.texts)]


def _sample(t, k: int) -> str:
    ok = bool(t.info.get("correct"))
    prompt_images = _prompt_images(t)
    n_prompt = len(prompt_images)
    turns, frames, img_i = [], [], n_prompt
    multi = len(t.texts) > 1 or any(x.get("observation_images") for x in t.texts)
    if multi:
        frames += [_img(u, "start") for u in prompt_images]
    for i, x in enumerate(t.texts, 1):
        obs = ""
        if x.get("observation"):
            obs = f'<div class="obs">&#8594; {_e(x["observation"])}</div>'
        turns.append(f'<div class="turn"><b>turn {i}</b> <span class="muted">{x["tokens"]} tokens, {_e(x["finish"])}, '
                     f'reward {x["reward"]:.3g}</span><div class="response">{_e(x["response"])}</div>{obs}</div>')
        said = " ".join(x["response"].split())[-40:]  # the move as the model wrote it, under the frame it led to
        for _ in range(x.get("observation_images", 0)):
            frames.append(_img(t.images[img_i], f"after turn {i}: {said}" if said else f"after turn {i}"))
            img_i += 1
    if multi:  # where the episode ended (the environment's closing frame), under the last move
        said = " ".join(t.texts[-1]["response"].split())[-40:] if t.texts else ""
        frames += [_img(u, f"end: {said}") for u in t.end_images]
    strip = f'<div class="frames">{"".join(frames)}</div>' if frames else ""
    badge = '<span class="badge ok">correct</span>' if ok else '<span class="badge bad">incorrect</span>'
    return (f'<div class="sample {"ok" if ok else "bad"}" data-correct="{int(ok)}"><div>sample {k} {badge} '
            f'<span class="muted">reward {t.reward:.3g} &middot; {t.turns} turn(s) &middot; {_e(t.done_reason)} &middot; '
            f'{t.response_len} response tokens</span></div>{strip}{"".join(turns)}</div>')


def write_report(path: Path, metrics: dict, trajs, records: dict[str, dict], max_records: int = 300) -> Path:
    """trajs: rollout.Trajectory list (n per record, in order); records: record id -> record."""
    by_record: dict = defaultdict(list)
    for t in trajs:
        by_record[(t.group, t.record_id)].append(t)
    cards = []
    for (_, rid), ts in list(by_record.items())[:max_records]:
        rec = records.get(rid, {})
        answers = ground_truths(rec)
        truth = " | ".join(answers) if answers else None
        imgs = "".join(_img(u, f"image {i + 1}") for i, u in enumerate(_prompt_images(ts[0])))
        cards.append(
            f'<div class="record"><h2>{_e(rid)} <span class="muted">{_e(ts[0].data_source)} &middot; {_e(ts[0].env_class)}'
            f'{" &middot; answer: " + _e(truth) if truth is not None else ""}</span></h2>'
            f'<div class="frames">{imgs}</div><div class="prompt">{_e(_prompt_text(rec))}</div>'
            + "".join(_sample(t, k) for k, t in enumerate(ts)) + "</div>")
    n_ok = sum(bool(t.info.get("correct")) for t in trajs)
    more = len(by_record) - len(cards)
    settings = metrics.get("settings", {})
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>vlrl eval: {_e(settings.get("model", ""))}</title><style>{CSS}</style></head>
<body>
<h1>vlrl eval</h1>
<div class="muted">model {_e(settings.get("model", ""))} &middot; data {_e(settings.get("data", ""))} &middot;
engine {_e(settings.get("engine", ""))} &middot; temperature {_e(settings.get("temperature", ""))} &middot;
n {_e(settings.get("n", ""))} &middot; seed {_e(settings.get("seed", ""))}</div>
{_summary_rows(metrics)}
<div class="filters"><button data-f="all">all ({len(trajs)})</button><button data-f="correct">correct ({n_ok})</button><button data-f="incorrect">incorrect ({len(trajs) - n_ok})</button></div>
{"".join(cards)}
{f'<p class="muted">{more} more records not shown; every trajectory is in rollouts.jsonl.</p>' if more > 0 else ""}
<script>{SCRIPT}</script>
</body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
