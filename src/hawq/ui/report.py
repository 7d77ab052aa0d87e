"""``hawq report DIR``: one self-contained HTML page and a Markdown file for a compress run.

Reads what :func:`hawq.post.pipeline.compress` writes into a run directory (``metrics.json``,
``sensitivity.json``, ``plan.json``, ``frontier.png``, ``layers.png``) plus what other commands
add when present (``command.json`` from the CLI, ``density.json`` from ``hawq report
--density``, ``finetune/finetune.json``, ``model.json`` from ``hawq export``). Every section
that has no data says "not computed" (with the command that computes it) instead of failing.
The HTML embeds its images as base64 PNG and one inline SVG, and loads nothing external. Both
files are written atomically.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hawq.base.errors import ConfigError, DataError, HawqError
from hawq.base.io import atomic_write_bytes, atomic_write_text, write_json

__all__ = ["NOT_COMPUTED", "ReportResult", "RunData", "Section", "bits_svg", "build_sections",
           "compute_density", "confirm_run_specs", "density_png", "load_run",
           "reconstructed_command", "record_command", "render_html", "render_markdown",
           "write_report"]

NOT_COMPUTED = "not computed"


# ----------------------------------------------------------------------------- run data

def record_command(out_dir: str | os.PathLike, argv: list[str] | None = None) -> Path:
    """Write ``command.json`` (argv, shell-quoted command line, cwd, time, versions) into
    ``out_dir`` so the report can show exactly what produced a run. Returns its path."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    return write_json(Path(out_dir) / "command.json", {
        "argv": ["hawq", *argv], "command": shlex.join(["hawq", *argv]), "cwd": os.getcwd(),
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "torch": torch.__version__})


@dataclass
class RunData:
    """The pieces of one run directory; each is None when its file is absent or unreadable
    (``problems`` says which files could not be read and why)."""

    run_dir: str
    metrics: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    command: dict[str, Any] | None = None
    density: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    images: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read_json(path: Path, problems: list[str]) -> Any:
    """The JSON object in ``path``; None (and a line in ``problems``) when the file is absent,
    unreadable or holds something other than an object."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{path.name}: holds a JSON {type(obj).__name__}, not an object")
        return None
    return obj


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read a run directory. Raises DataError when ``run_dir`` is not a directory or holds no
    readable run (none of metrics.json, plan.json, finetune/finetune.json); other unreadable
    files are listed in ``problems`` (the report shows them)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise DataError(f"run directory {str(d)!r} does not exist: give the --out folder of "
                        "'hawq compress'")
    run = RunData(str(d))
    p = run.problems
    run.metrics = _read_json(d / "metrics.json", p)
    run.sensitivity = _read_json(d / "sensitivity.json", p)
    run.plan = _read_json(d / "plan.json", p)
    run.command = _read_json(d / "command.json", p)
    run.density = _read_json(d / "density.json", p)
    run.finetune = _read_json(d / "finetune" / "finetune.json", p)
    man = _read_json(d / "model.json", p)
    run.export = man if isinstance(man, dict) and man.get("format") == "hawq-packed" else None
    for name in ("frontier.png", "layers.png"):
        f = d / name
        if f.is_file():
            data = f.read_bytes()
            if data[:8] == b"\x89PNG\r\n\x1a\n":
                run.images[name] = data
            else:
                p.append(f"{name}: not a PNG")
    if run.metrics is None and run.plan is None and run.finetune is None:
        why = "; ".join(p) if p else "no metrics.json, plan.json or finetune/finetune.json"
        raise DataError(f"run directory {str(d)!r} holds no readable hawq run ({why}): give the "
                        "--out folder of 'hawq compress' or 'hawq zeroq'")
    return run


# ----------------------------------------------------------------------------- figures

def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def density_png(density: dict[str, Any]) -> bytes:
    """PNG of an SLQ eigenvalue density (the dict of :class:`SpectralDensity`), log scale."""
    import numpy as np

    from hawq.analysis.hessian_density import SpectralDensity

    sd = SpectralDensity(**{k: density[k] for k in ("nodes", "weights", "dim", "hvp_count",
                                                    "seconds")})
    nodes = np.concatenate([np.asarray(n, dtype=float) for n in sd.nodes])
    lo, hi = float(nodes.min()), float(nodes.max())
    pad = 0.05 * max(hi - lo, 1e-12)
    grid = np.linspace(lo - pad, hi + pad, 600)
    dens = np.maximum(sd.density(grid), 1e-12)
    fig = _new_figure(7.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(grid, dens, color="tab:blue", lw=1.4)
    ax.set_ylim(max(dens.max() * 1e-9, 1e-12), dens.max() * 3)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title(f"Hessian eigenvalue density (SLQ, {len(sd.nodes)} x {len(sd.nodes[0])} "
                 f"Lanczos steps, {sd.dim:,} weights)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _regenerate(run: RunData) -> None:
    """Rebuild missing frontier/layers plots from metrics.json when it has what they need."""
    import tempfile

    import numpy as np

    m = run.metrics or {}
    rows = _rows(m.get("layers"))
    if not rows:
        return
    with tempfile.TemporaryDirectory() as tmp:
        if "layers.png" not in run.images:
            try:
                from hawq.base.plots import plot_layer_bits

                score = [r.get("avg_trace") if r.get("avg_trace") is not None
                         else float(np.max(r.get("omega") or [0.0])) for r in rows]
                bits = [_mean_bits(r.get("w_bits")) for r in rows]
                p = plot_layer_bits([r["name"] for r in rows], score, bits,
                                    Path(tmp) / "layers.png")
                run.images["layers.png"] = p.read_bytes()
            except Exception as exc:
                run.problems.append(f"layers.png: could not be regenerated ({exc})")
        if "frontier.png" not in run.images and all(r.get("omega") for r in rows):
            try:
                from hawq.maths.allocation import Allocation, pareto_frontier, uniform_points
                from hawq.base.plots import plot_frontier

                omega = np.array([r["omega"] for r in rows], dtype=float)
                params = np.array([r["params"] for r in rows], dtype=float)
                bits = np.array(m["config"]["bits"])
                chosen = Allocation(**m["allocation"]) if m.get("allocation") else None
                p = plot_frontier(pareto_frontier(omega, params, bits, max_points=20000),
                                  Path(tmp) / "frontier.png", chosen=chosen,
                                  uniform=uniform_points(omega, params, bits))
                run.images["frontier.png"] = p.read_bytes()
            except Exception as exc:
                run.problems.append(f"frontier.png: could not be regenerated ({exc})")


def _e(v: Any) -> str:
    """``v`` as text, HTML-escaped (quotes too): every value from a run's files goes through
    this (or :func:`_table`, which escapes its cells) before it reaches the page."""
    return html.escape(str(v), quote=True)


def _n(v: Any) -> float | None:
    """``v`` as a float when it is a real number (not a bool, not a string), else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _d(v: Any) -> dict[str, Any]:
    """``v`` when it is a dict, else an empty one (a run's JSON may hold anything)."""
    return v if isinstance(v, dict) else {}


def _rows(v: Any) -> list[dict[str, Any]]:
    """The dict entries of ``v`` when it is a list, else none."""
    return [r for r in v if isinstance(r, dict)] if isinstance(v, list) else []


def _mean_bits(w: Any) -> float:
    if isinstance(w, list):
        vals = [_n(b) for b in w]
        return sum(vals) / len(vals) if vals and None not in vals else float("nan")
    x = _n(w)
    return x if x is not None else float("nan")


_BIT_COLOURS = {2: "#d7301f", 3: "#fc8d59", 4: "#fdbb84", 5: "#c7e9b4", 6: "#7fcdbb",
                7: "#41b6c4", 8: "#2c7fb8"}


def _colour(bits: float) -> str:
    if bits != bits:  # NaN
        return "#cccccc"
    if bits >= 16:
        return "#888888"
    return _BIT_COLOURS.get(int(round(bits)), "#cccccc") if abs(bits) < 1e6 else "#cccccc"


def bits_svg(rows: list[dict[str, Any]], width: int = 1000, height: int = 150) -> str:
    """Inline SVG: one bar per layer, height = weight bits, colour = bits, hover = name."""
    n = max(len(rows), 1)
    gap = 2
    bw = min(max((width - 40) / n - gap, 1.0), 36.0)
    width = int(min(width, max(320, 40 + n * (bw + gap))))  # few layers: a compact strip
    top = 8
    h = height - 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="bits" viewBox="0 0 {width} '
             f'{height}" width="{width}" style="max-width:100%" role="img" '
             f'aria-label="weight bits per layer">']
    for b in (2, 4, 8):
        y = top + h - h * b / 8
        parts.append(f'<line x1="32" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="28" y="{y + 4:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#666">{b}</text>')
    for i, r in enumerate(rows):
        b = _mean_bits(r.get("w_bits"))
        bb = min(max(b, 0.0), 8.0) if b == b else 0.0
        x = 36 + i * (bw + gap)
        y = top + h - h * bb / 8
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h * bb / 8:.1f}" '
                     f'fill="{_colour(b)}"><title>{_e(r.get("name"))}: '
                     f'{_e(_fmt_bits(r.get("w_bits")))} bits</title></rect>')
    parts.append(f'<text x="36" y="{height - 6}" font-size="11" fill="#666">layers in forward '
                 f'order (hover for names) &#8594;</text></svg>')
    return "".join(parts)


# ----------------------------------------------------------------------------- formatting

def _fmt_num(v: Any, digits: int = 4) -> str:
    """A number for display (plain text: escape it before it goes into HTML)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.{digits}g}"
    return str(v)


def _fmt_bits(w: Any) -> str:
    """Bits for display (plain text)."""
    if isinstance(w, list):
        vals = [_n(b) for b in w]
        if not vals or None in vals:
            return str(w)
        return f"per-channel {_fmt_num(min(w))}–{_fmt_num(max(w))} (mean {_mean_bits(w):.2f})"
    return "–" if w is None else str(w)


def _bytes(n: Any) -> str:
    """Bytes for display (plain text); a value that is not a number is shown as it is."""
    if n is None:
        return "–"
    x = _n(n)
    if x is None:
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def _pct(v: Any) -> str:
    """A fraction as a percentage (plain text); a value that is not a number as it is."""
    if v is None:
        return "–"
    x = _n(v)
    return str(v) if x is None else f"{100 * x:.2f}%"


def reconstructed_command(config: dict[str, Any]) -> str:
    """A ``hawq compress`` (or, for a ZeroQ run's config, ``hawq zeroq``) command line equivalent
    to a run's recorded config: the flags :func:`hawq.post.config.config_to_argv` writes (defaults
    omitted), so it parses back to the same config. Used when the run has no command.json.
    Raises :class:`ConfigError` when the recorded config is not valid today."""
    from hawq.post.config import CompressConfig, ZeroQConfig, config_from_dict, config_to_argv

    zero = "data_source" in config or "distill_iters" in config
    cfg = config_from_dict(ZeroQConfig if zero else CompressConfig, config)
    return shlex.join(["hawq", "zeroq" if zero else "compress", *config_to_argv(cfg)])


# ----------------------------------------------------------------------------- sections

@dataclass
class Section:
    """One report section: title, whether its data exists, HTML and Markdown bodies."""

    key: str
    title: str
    present: bool
    html: str
    md: str


def _md(v: Any) -> str:
    """``v`` as Markdown text that renders as itself: ``&``, ``<``, ``>`` as entities (no raw
    HTML reaches a Markdown viewer), newlines as spaces."""
    return html.escape(" ".join(str(v).splitlines()), quote=False)


def _md_code(v: Any) -> str:
    """``v`` as a Markdown inline code span (verbatim, delimited by a backtick run longer than
    any inside it), newlines as spaces."""
    import re

    text = " ".join(str(v).splitlines())
    ticks = "`" * (max((len(t) for t in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks} {text} {ticks}" if "`" in text else f"`{text}`"


def _nc(what: str, how: str | None = None) -> tuple[str, str]:
    hint = f" — {how}" if how else ""
    return (f'<p class="nc"><b>{NOT_COMPUTED}</b>: {_e(what)}{_e(hint)}</p>',
            f"*{NOT_COMPUTED}*: {_md(what)}{_md(hint)}\n")


def _img(name: str, data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" data-plot="{html.escape(name)}" '
            f'src="data:image/png;base64,{b64}"></figure>')


def _table(header: list[str], rows: list[list[str]], numeric: set[int] | None = None,
           raw_html: bool = False) -> tuple[str, str]:
    numeric = numeric or set()
    th = "".join(f'<th{" class=num" if i in numeric else ""}>{_e(h)}</th>'
                 for i, h in enumerate(header))
    body = []
    for r in rows:
        tds = "".join(f'<td{" class=num" if i in numeric else ""}>'
                      f'{c if raw_html else _e(c)}</td>' for i, c in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    h = f'<div class="tw"><table><thead><tr>{th}</tr></thead><tbody>{"".join(body)}' \
        f"</tbody></table></div>"

    def md_cell(c: str) -> str:
        import re

        # raw HTML cells hold escaped values inside tags: drop the tags; text cells: escape
        text = re.sub(r"<[^>]+>", "", str(c)) if raw_html else _md(c)
        return " ".join(text.splitlines()).replace("|", "\\|")

    md = ["| " + " | ".join(md_cell(h) for h in header) + " |",
          "|" + "|".join("---:" if i in numeric else "---" for i in range(len(header))) + "|"]
    md += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return h, "\n".join(md) + "\n"


def _fence(text: str, lang: str = "") -> str:
    """A Markdown code block holding ``text`` verbatim (its fence longer than any run of
    backticks inside, so the text cannot close it)."""
    import re

    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}\n"


def _sec_command(run: RunData, cfg: dict[str, Any]) -> list[Section]:
    if run.command:
        c = run.command
        argv = c.get("argv")
        cmd = c.get("command")
        if not isinstance(cmd, str) or not cmd:
            cmd = (shlex.join(argv) if isinstance(argv, list)
                   and all(isinstance(a, str) for a in argv) else str(argv or ""))
        when, cwd, torch_v = str(c.get("time", "")), str(c.get("cwd", "")), str(c.get("torch", "?"))
        return [Section("command", "Command", True,
                        f"<pre><code>{_e(cmd)}</code></pre><p class=muted>run {_e(when)} in "
                        f"<code>{_e(cwd)}</code> (torch {_e(torch_v)})</p>",
                        f"{_fence(cmd, 'bash')}\nrun {_md(when)} in {_md_code(cwd)}\n")]
    if cfg:
        try:
            cmd = reconstructed_command(cfg)
        except Exception as e:  # a config today's checks reject: say so, never fail the report
            cmd = f"# metrics.json's config does not rebuild as a command: {e}"
        return [Section("command", "Command", False,
                        f"<p class=nc>The run did not record its command line (command.json);"
                        f" an equivalent command rebuilt from metrics.json:</p><pre><code>"
                        f"{_e(cmd)}</code></pre>",
                        f"Command line {NOT_COMPUTED} (no command.json); equivalent command "
                        f"rebuilt from metrics.json:\n\n{_fence(cmd, 'bash')}")]
    h, md = _nc("no command.json or metrics.json in the run directory")
    return [Section("command", "Command", False, h, md)]


def _sec_summary(run: RunData, m: dict[str, Any], cfg: dict[str, Any]) -> list[Section]:
    title = "Accuracy, size and BOPs: before and after"
    if not m:
        h, md = _nc("metrics.json is missing", "run 'hawq compress --out DIR'")
        return [Section("summary", title, False, h, md)]
    b = _d(m.get("budget"))
    uni = _d(m.get("uniform"))
    metric = str(m.get("metric") or "accuracy")  # the task's metric: perplexity, cosine, loss...
    fp32_acc, acc = m.get("fp32_accuracy"), m.get("accuracy")
    if metric == "accuracy":
        fp32_acc = m.get("fp32_value", fp32_acc) if fp32_acc is None else fp32_acc
        acc = m.get("value", acc) if acc is None else acc
        f0, f1 = _n(fp32_acc), _n(acc)
        head, fmt = "Top-1", _pct
        dtext = "–" if f0 is None or f1 is None else f"{100 * (f1 - f0):+.2f} points"
    else:
        fp32_acc, acc = m.get("fp32_value"), m.get("value")
        f0, f1 = _n(fp32_acc), _n(acc)
        better = "higher" if _d(m.get("task")).get("higher_is_better") is True else "lower"
        head, fmt = metric.capitalize(), _fmt_num
        dtext = ("–" if f0 is None or f1 is None
                 else f"{f1 - f0:+.4g} ({better} is better)")
    if uni.get("value") is not None:
        dtext += f"; uniform {uni.get('w_bits')}-bit: {fmt(uni['value'])}"
    fp32_bytes, size = b.get("fp32_bytes"), b.get("size_bytes")
    bops, fbops = _n(b.get("bops")), _n(b.get("fp32_bops"))
    gb = (None if fbops is None else fbops / 1e9), (None if bops is None else bops / 1e9)
    cards = [  # (key, value, sub): plain text; <b> marks the "after" value
        (head, (fmt(fp32_acc), fmt(acc)), dtext),
        ("Model size", (_bytes(fp32_bytes), _bytes(size)),
         f"{_fmt_num(b.get('compression'), 3)}x smaller (weights "
         f"{_fmt_num(b.get('weight_compression'), 3)}x)"),
        ("Weight bits", ("32", f"{_fmt_num(b.get('avg_bits'), 3)}"),
         f"activations {cfg.get('a_bits', '–')}-bit"),
        ("BOPs", (f"{_fmt_num(gb[0], 4)} G", f"{_fmt_num(gb[1], 4)} G"),
         "–" if not bops or not fbops else f"{fbops / bops:.1f}x fewer"),
    ]
    card_html = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v0)} &#8594; '
        f'<b>{_e(v1)}</b>{" avg" if k == "Weight bits" else ""}</div>'
        f'<div class="s">{_e(sub)}</div></div>' for k, (v0, v1), sub in cards)
    rows = [["top-1 accuracy" if metric == "accuracy" else metric, fmt(fp32_acc), fmt(acc)],
            ["model size", _bytes(fp32_bytes), _bytes(size)],
            ["weight bits (avg)", "32", _fmt_num(b.get("avg_bits"), 4)],
            ["BOPs (G)", _fmt_num(gb[0]), _fmt_num(gb[1])],
            ["MACs per sample", _fmt_num(b.get("macs")), _fmt_num(b.get("macs"))]]
    header = ["", "FP32", "quantized"]
    if uni:  # the uniform plan of the same size, measured by the run
        header.append(f"uniform {uni.get('w_bits')}-bit (same size)")
        for r, v in zip(rows, [fmt(uni.get("value")), _bytes(uni.get("size_bytes")),
                               _fmt_num(uni.get("w_bits")), "–", _fmt_num(b.get("macs"))]):
            r.append(v)
    th, tm = _table(header, rows, set(range(1, len(header))))
    secs = [_n(v) for v in _d(m.get("seconds")).values()]
    alloc = _d(m.get("allocation"))
    total = _n(b.get("total_params"))
    info = (f"model <code>{_e(cfg.get('model'))}</code>, sensitivity "
            f"<code>{_e(cfg.get('sensitivity'))}</code>, allocator "
            f"<code>{_e(cfg.get('allocator'))}</code> "
            f"({_e(alloc.get('method', ''))}"
            f"{', optimal' if alloc.get('optimal') is True else ''}), candidate bits "
            f"{_e(cfg.get('bits'))}, {_e(_fmt_num(b.get('total_params', 0)) if total is None else f'{total:,.0f}')} "
            f"parameters; time {sum(x for x in secs if x is not None):.1f} s")
    return [Section("summary", title, True,
                    f'<p>{info}</p><div class="cards">{card_html}</div>{th}',
                    f"{_strip(info)}\n\n{tm}")]


def _sec_layers(m: dict[str, Any]) -> list[Section]:
    title = "Per-layer sensitivity and bits"
    rows_m = _rows(m.get("layers"))
    if not rows_m:
        h, md = _nc("no per-layer rows (metrics.json missing)")
        return [Section("layers", title, False, h, md)]
    rows = []
    for i, r in enumerate(rows_m):
        tr, se = _n(r.get("trace")), _n(r.get("stderr"))
        trace = (_fmt_num(r.get("trace")) if tr is None
                 else f"{tr:.4g} ± {se:.2g}" if se is not None else f"{tr:.4g}")
        eig = r.get("eigenvalue")
        eig = eig[0] if isinstance(eig, list) and eig else eig
        wb = r.get("w_bits")
        badge = (f'<span class="b" style="background:{_colour(_mean_bits(wb))}">'
                 f'{_e(_fmt_bits(wb))}</span>')
        rows.append([str(i), _e(r.get("name", "")), _e(r.get("type", "")),
                     _e(_fmt_num(r.get("params"))), _e(_fmt_num(r.get("macs"))), _e(trace),
                     _e(_fmt_num(r.get("avg_trace"))),
                     _e(_fmt_num(eig)) if eig is not None else NOT_COMPUTED, badge,
                     _e(r.get("a_bits", "–"))])
    th, tm = _table(["#", "layer", "type", "params", "MACs", "trace ± stderr",
                     "avg trace", "top eigenvalue", "w bits", "a bits"], rows,
                    {0, 3, 4, 5, 6, 7, 9}, raw_html=True)
    return [Section("layers", title, True, bits_svg(rows_m) + th, tm)]


def _sec_plots(run: RunData, md_images: dict[str, str]) -> list[Section]:
    out = []
    for key, name, title, how in (
            ("frontier", "frontier.png", "Pareto frontier: total Omega vs weight size",
             "rerun 'hawq compress --out DIR'"),
            ("sensitivity", "layers.png", "Sensitivity and chosen bits per layer",
             "rerun 'hawq compress --out DIR'")):
        if name in run.images:
            link = md_images.get(name)
            md = f"![{title}]({link})\n" if link else f"({title}: embedded in the HTML)\n"
            out.append(Section(key, title, True, _img(name, run.images[name], title), md))
        else:
            h, md = _nc(f"{name} is missing", how)
            out.append(Section(key, title, False, h, md))
    return out


def _sec_density(run: RunData, md_images: dict[str, str]) -> list[Section]:
    title = "Hessian eigenvalue density"
    if run.density and "density.png" in run.images:
        d = run.density
        dim, hvps, secs = _n(d.get("dim")), d.get("hvp_count"), _n(d.get("seconds"))
        text = (f"SLQ over {_fmt_num(d.get('dim')) if dim is None else f'{dim:,.0f}'} weights, "
                f"{_fmt_num(hvps)} Hessian-vector products, "
                f"{_fmt_num(d.get('seconds')) if secs is None else f'{secs:.1f}'} s")
        link = md_images.get("density.png")
        return [Section("density", title, True,
                        _img("density.png", run.images["density.png"], "eigenvalue density")
                        + f"<p class=muted>{_e(text)}</p>",
                        (f"![eigenvalue density]({link})\n\n" if link else "") + _md(text)
                        + "\n")]
    h, md = _nc("the Hessian eigenvalue density", "run 'hawq report DIR --density'")
    return [Section("density", title, False, h, md)]


def _sec_finetune(run: RunData) -> list[Section]:
    ft = run.finetune
    if not ft:
        h, md = _nc("no fine-tuning in this run", "use 'hawq compress --finetune EPOCHS'")
        return [Section("finetune", "Fine-tuning", False, h, md)]
    hist = _rows(_d(ft.get("finetune")).get("history"))
    rows = [[str(h.get("epoch")), _fmt_num(h.get("loss")), _pct(h.get("train_accuracy")),
             _fmt_num(h.get("seconds"), 3)] for h in hist]
    th, tm = _table(["epoch", "loss", "train top-1", "seconds"], rows, {0, 1, 2, 3})
    txt = (f"FP32 {_pct(ft.get('fp32_accuracy'))}, post-training "
           f"{_pct(ft.get('ptq_accuracy'))}, after fine-tuning {_pct(ft.get('accuracy'))}")
    return [Section("finetune", "Fine-tuning", True, f"<p>{_e(txt)}</p>{th}",
                    _md(txt) + "\n\n" + tm)]


def _sec_export(run: RunData) -> list[Section]:
    ex = run.export
    if not ex:
        h, md = _nc("no packed export in the run directory", "run 'hawq export --run DIR'")
        return [Section("export", "Packed integer export", False, h, md)]
    s = _d(ex.get("sizes"))
    rows = [["accounted size (budget_report)", _bytes(s.get("accounted_bytes"))],
            ["stored payload (packed weights + float params)", _bytes(s.get("payload_bytes"))],
            ["tensor file", _bytes(s.get("file_bytes"))],
            ["scales / zero points / bit lists", _bytes(s.get("quant_meta_bytes"))],
            ["buffers (BN statistics, activation ranges)", _bytes(s.get("buffer_bytes"))],
            ["safetensors header", _bytes(s.get("header_bytes"))]]
    th, tm = _table(["", "bytes"], rows, {1})
    return [Section("export", "Packed integer export", True, th, tm)]


_SECTION_TITLES = {"command": "Command", "summary": "Accuracy, size and BOPs: before and after",
                   "layers": "Per-layer sensitivity and bits",
                   "frontier": "Pareto frontier: total Omega vs weight size",
                   "density": "Hessian eigenvalue density", "finetune": "Fine-tuning",
                   "export": "Packed integer export"}


def build_sections(run: RunData, md_images: dict[str, str]) -> list[Section]:
    """All report sections, in order. ``md_images`` maps image names to the relative paths the
    Markdown file should link (images without a path are described as embedded in the HTML).
    Every value taken from the run's files is HTML-escaped; a section whose data cannot be
    shown (a damaged or crafted file) says so instead of failing the report."""
    m = _d(run.metrics)
    cfg = _d(m.get("config"))
    builders = [("command", lambda: _sec_command(run, cfg)),
                ("summary", lambda: _sec_summary(run, m, cfg)),
                ("layers", lambda: _sec_layers(m)),
                ("frontier", lambda: _sec_plots(run, md_images)),
                ("density", lambda: _sec_density(run, md_images)),
                ("finetune", lambda: _sec_finetune(run)),
                ("export", lambda: _sec_export(run))]
    out: list[Section] = []
    for key, build in builders:
        try:
            out.extend(build())
        except Exception as exc:  # never fail the whole report on one section's data
            why = f"its data could not be shown ({type(exc).__name__}: {exc})"
            run.problems.append(f"section {_SECTION_TITLES[key]!r}: {why}")
            h, md = _nc(why)
            out.append(Section(key, _SECTION_TITLES[key], False, h, md))
    if run.problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in run.problems)
        out.append(Section("problems", "Files that could not be used", True,
                           f"<ul>{items}</ul>",
                           "".join(f"- {_md(p)}\n" for p in run.problems)))
    return out


def _strip(s: str) -> str:
    import re

    # tags become code marks; escaped values stay entities (Markdown shows them as text)
    return re.sub(r"<[^>]+>", "`", s).replace("``", "`")


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232b;
background:#f5f6f8;margin:0}
main{max-width:1120px;margin:0 auto;padding:24px 28px 60px}
header{background:#1d2b3a;color:#fff;padding:22px 28px}
header h1{margin:0 auto;max-width:1120px;font-size:24px;font-weight:600}
header p{margin:4px auto 0;max-width:1120px;color:#b8c4d0;font-size:13px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:16px 20px;
margin:18px 0}
h2{font-size:18px;margin:0 0 12px;font-weight:600}
pre{background:#f0f2f4;padding:10px 12px;border-radius:6px;overflow-x:auto;font-size:13px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:12px;
margin:12px 0 16px}
.card{border:1px solid #e1e4e8;border-radius:8px;padding:10px 14px;background:#fafbfc}
.card .k{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:#6a737d}
.card .v{font-size:18px;margin:4px 0}.card .s{font-size:13px;color:#586069}
.tw{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid #eaecef;text-align:left;white-space:nowrap}
th{background:#f6f8fa;font-weight:600}td.num,th.num{text-align:right;
font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fbfcfd}
.b{display:inline-block;min-width:22px;padding:1px 7px;border-radius:10px;text-align:center;
color:#111;font-weight:600}
figure{margin:0}img{max-width:100%;height:auto;display:block;margin:0 auto}
.nc{color:#8a6d00;background:#fff8e1;border:1px solid #f3e3a5;padding:8px 12px;
border-radius:6px}
.muted{color:#6a737d;font-size:13px}svg.bits{display:block;margin:4px 0 14px}
nav{font-size:13px;margin:14px 0 0}nav a{margin-right:12px;color:#0366d6;text-decoration:none}
"""


def render_html(run: RunData, sections: list[Section]) -> str:
    """The self-contained HTML page (no external resources)."""
    model = _d(_d(run.metrics).get("config")).get("model", "unknown model")
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}" data-present="{str(s.present).lower()}">'
                   f"<h2>{html.escape(s.title)}</h2>{s.html}</section>" for s in sections)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f'content="width=device-width,initial-scale=1"><title>hawq report: '
            f"{html.escape(str(model))}</title><style>{_CSS}</style></head><body><header><h1>"
            f"hawq report: {html.escape(str(model))}</h1><p>run directory "
            f"{html.escape(os.path.abspath(run.run_dir))} · generated {now}</p></header><main>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")


def render_markdown(run: RunData, sections: list[Section]) -> str:
    """The Markdown version (images linked by relative path)."""
    model = _d(_d(run.metrics).get("config")).get("model", "unknown model")
    parts = [f"# hawq report: {_md(model)}\n",
             f"Run directory: {_md_code(os.path.abspath(run.run_dir))}\n"]
    for s in sections:
        parts.append(f"## {s.title}\n\n{s.md}")
    return "\n".join(parts)


@dataclass
class ReportResult:
    """Paths written and which sections had data (``sections``: key -> present)."""

    html_path: str
    md_path: str
    sections: dict[str, bool]
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
                 ) -> ReportResult:
    """Render ``report.html`` and ``report.md`` for ``run_dir`` into ``out_dir`` (default the
    run directory), atomically. Missing inputs become "not computed" sections. Returns a
    :class:`ReportResult`. Cost: reading the run's files; regenerating missing plots (and the
    density plot) with matplotlib, about a second each."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    on_disk = {n for n in run.images}
    _regenerate(run)
    if run.density:
        try:
            run.images["density.png"] = density_png(run.density)
        except Exception as exc:
            run.problems.append(f"density.json: could not be plotted ({exc})")
    md_images: dict[str, str] = {}
    for name, data in run.images.items():
        if name in on_disk:
            src = Path(run_dir) / name
            md_images[name] = os.path.relpath(src, out)
        else:  # regenerated or computed: write it beside the Markdown so the link works
            target = out / "report_files" / name
            atomic_write_bytes(target, data)
            md_images[name] = os.path.relpath(target, out)
    sections = build_sections(run, md_images)
    html_path = atomic_write_text(out / "report.html", render_html(run, sections))
    md_path = atomic_write_text(out / "report.md", render_markdown(run, sections))
    return ReportResult(str(html_path), str(md_path), {s.key: s.present for s in sections},
                        list(run.problems))


def confirm_run_specs(run_dir: str | os.PathLike, recorded_model: Any, recorded_data: Any,
                      model: str | None = None, data: str | None = None) -> tuple[str, str | None]:
    """The (model, data) specs to rebuild a run from, never taken from the run's files when
    they would import code: a built-in registry model name may come from the run; a model or
    data *factory* (``pkg.module:factory``, ``file.py:factory``) must be given by the caller
    (``model``/``data``, from ``--model``/``--data``) and equal what the run recorded.
    Raises ConfigError naming both specs when they differ or one is missing. Cost: none."""
    from hawq.modules.models import MODELS

    where = f"run {str(run_dir)!r}"
    if isinstance(recorded_model, str) and recorded_model in MODELS:
        if model is not None and model != recorded_model:
            raise ConfigError(f"--model {model!r} differs from the model {recorded_model!r} "
                              f"{where} was made with: drop --model or give --model "
                              f"{recorded_model}")
        name = recorded_model
    elif not isinstance(recorded_model, str) or ":" not in recorded_model:
        raise ConfigError(f"{where}: its model {recorded_model!r} is neither a built-in name "
                          f"({MODELS.names()}) nor 'pkg.module:factory': it was handed to "
                          "hawq.compress as an object, so it cannot be rebuilt from the "
                          "command line; save the compressed model in Python with "
                          "hawq.post.export.save_quantized(model, path), or run 'hawq compress "
                          "--model pkg.module:factory'")
    elif model is None:
        raise ConfigError(f"{where} was made on your model factory {recorded_model!r}; hawq "
                          "never imports code named in a run's files: give it yourself with "
                          f"--model {recorded_model}"
                          + (f" --data {recorded_data}" if isinstance(recorded_data, str)
                             and recorded_data else ""))
    elif model != recorded_model:
        raise ConfigError(f"--model {model!r} differs from the model factory {recorded_model!r} "
                          f"{where} was made with: give --model {recorded_model} (the run's "
                          "plan fits that model)")
    else:
        name = model
    if recorded_data is not None and not isinstance(recorded_data, str):
        raise ConfigError(f"{where}: its recorded data spec {recorded_data!r} is not a string; "
                          "the run's metrics.json is damaged: rerun 'hawq compress'")
    if recorded_data:
        if data is None:
            raise ConfigError(f"{where} was made on your data factory {recorded_data!r}; hawq "
                              "never imports code named in a run's files: give it yourself "
                              f"with --data {recorded_data}")
        if data != recorded_data:
            raise ConfigError(f"--data {data!r} differs from the data {recorded_data!r} {where} "
                              f"was made with: give --data {recorded_data}")
    elif data is not None:
        raise ConfigError(f"--data {data!r}: {where} was made without a data factory (on "
                          f"{'the model factory' if ':' in name else 'the built-in'} data); "
                          "drop --data")
    return name, recorded_data or None


def compute_density(run_dir: str | os.PathLike, *, samples: int = 256, n_steps: int = 40,
                    n_vectors: int = 1, progress: bool = False, model: str | None = None,
                    data: str | None = None) -> Path:
    """Compute the SLQ Hessian eigenvalue density of the run's FP32 model on ``samples``
    training samples (the run's model, data dir and seed from metrics.json) and write
    ``density.json`` into the run directory. A run on your own model or data factory needs
    ``model=`` / ``data=`` (the specs, as typed on the command line) equal to the run's:
    nothing named in the run's files is imported (:func:`confirm_run_specs`). Cost:
    n_vectors * n_steps Hessian-vector products (see
    :func:`hawq.analysis.hessian_density.spectral_density`)."""
    from hawq.feed.data import load_dataset
    from hawq.analysis.hessian_density import spectral_density
    from hawq.modules.models import MODELS, build_model, get_spec

    run = load_run(run_dir)
    cfg = (run.metrics or {}).get("config")
    if not isinstance(cfg, dict) or not cfg:
        raise DataError(f"{run_dir}: metrics.json is missing, so the model is unknown; run "
                        "'hawq compress --out DIR' first")
    name, data_spec = confirm_run_specs(run_dir, cfg.get("model"), cfg.get("data"), model, data)
    task = cfg.get("task")
    if task is not None and not isinstance(task, str):
        raise DataError(f"{run_dir}: metrics.json's task {task!r} is not a task name; rerun "
                        "'hawq compress'")
    cfg = dict(cfg, data=data_spec)
    if name in MODELS and not cfg.get("data"):
        spec = get_spec(name)
        model = build_model(name, pretrained=True, data_dir=cfg.get("data_dir"))
        data = load_dataset(spec.dataset, "train", cfg.get("data_dir"), samples).tensors
    else:  # the user's model / data, by the specs the caller gave (= the run's)
        from hawq.ui.loading import load_object, unpack_data, unpack_setup
        from hawq.feed.tasks import materialize

        if name in MODELS:
            model, splits = build_model(name, pretrained=True, data_dir=cfg.get("data_dir")), {}
        else:
            setup = unpack_setup(load_object(name, "model"), f"model {name!r}")
            model, splits = setup.model, setup.data
            if setup.task is not None and task in (None, "classification"):
                task = setup.task
        if cfg.get("data"):
            splits = unpack_data(load_object(cfg["data"], "data"), f"data {cfg['data']!r}")
        if model is None or splits.get("calib") is None:
            raise DataError(f"{run_dir}: the run's model {name!r} brings no calibration data "
                            "and its config names no data factory: the density cannot be "
                            "computed")
        data = materialize(splits["calib"], samples, "calibration data", limit=samples)
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"{run_dir}: metrics.json's seed {seed!r} is not an integer; rerun "
                        "'hawq compress'")
    res = spectral_density(model, data, n_steps=n_steps, n_vectors=n_vectors,
                           seed=seed, progress=progress, task=task)
    return write_json(Path(run_dir) / "density.json", res.to_dict() | {"samples": samples})
