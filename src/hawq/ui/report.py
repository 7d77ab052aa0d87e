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

from hawq.base.errors import DataError, HawqError
from hawq.base.io import atomic_write_bytes, atomic_write_text, write_json

__all__ = ["NOT_COMPUTED", "ReportResult", "RunData", "Section", "bits_svg", "build_sections",
           "compute_density", "density_png", "load_run", "reconstructed_command",
           "record_command", "render_html", "render_markdown", "write_report"]

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
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return None


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read a run directory. Raises DataError only when ``run_dir`` is not a directory."""
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
    rows = m.get("layers") or []
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


def _mean_bits(w: Any) -> float:
    if isinstance(w, list):
        return sum(w) / len(w) if w else float("nan")
    return float(w) if w is not None else float("nan")


_BIT_COLOURS = {2: "#d7301f", 3: "#fc8d59", 4: "#fdbb84", 5: "#c7e9b4", 6: "#7fcdbb",
                7: "#41b6c4", 8: "#2c7fb8"}


def _colour(bits: float) -> str:
    if bits != bits:  # NaN
        return "#cccccc"
    return _BIT_COLOURS.get(int(round(bits)), "#888888" if bits >= 16 else "#cccccc")


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
        bb = min(b, 8.0) if b == b else 0.0
        x = 36 + i * (bw + gap)
        y = top + h - h * bb / 8
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h * bb / 8:.1f}" '
                     f'fill="{_colour(b)}"><title>{html.escape(str(r.get("name")))}: '
                     f'{_fmt_bits(r.get("w_bits"))} bits</title></rect>')
    parts.append(f'<text x="36" y="{height - 6}" font-size="11" fill="#666">layers in forward '
                 f'order (hover for names) &#8594;</text></svg>')
    return "".join(parts)


# ----------------------------------------------------------------------------- formatting

def _fmt_num(v: Any, digits: int = 4) -> str:
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
    if isinstance(w, list):
        return f"per-channel {min(w)}–{max(w)} (mean {_mean_bits(w):.2f})"
    return "–" if w is None else str(w)


def _bytes(n: Any) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.2f}%"


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


def _nc(what: str, how: str | None = None) -> tuple[str, str]:
    hint = f" — {how}" if how else ""
    return (f'<p class="nc"><b>{NOT_COMPUTED}</b>: {html.escape(what)}{html.escape(hint)}</p>',
            f"*{NOT_COMPUTED}*: {what}{hint}\n")


def _img(name: str, data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" data-plot="{html.escape(name)}" '
            f'src="data:image/png;base64,{b64}"></figure>')


def _table(header: list[str], rows: list[list[str]], numeric: set[int] | None = None,
           raw_html: bool = False) -> tuple[str, str]:
    numeric = numeric or set()
    th = "".join(f'<th{" class=num" if i in numeric else ""}>{html.escape(h)}</th>'
                 for i, h in enumerate(header))
    body = []
    for r in rows:
        tds = "".join(f'<td{" class=num" if i in numeric else ""}>'
                      f'{c if raw_html else html.escape(c)}</td>' for i, c in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    h = f'<div class="tw"><table><thead><tr>{th}</tr></thead><tbody>{"".join(body)}' \
        f"</tbody></table></div>"

    def md_cell(c: str) -> str:
        import re

        return re.sub(r"<[^>]+>", "", c).replace("|", "\\|")

    md = ["| " + " | ".join(header) + " |",
          "|" + "|".join("---:" if i in numeric else "---" for i in range(len(header))) + "|"]
    md += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return h, "\n".join(md) + "\n"


def build_sections(run: RunData, md_images: dict[str, str]) -> list[Section]:
    """All report sections, in order. ``md_images`` maps image names to the relative paths the
    Markdown file should link (images without a path are described as embedded in the HTML)."""
    m = run.metrics or {}
    cfg = m.get("config") or {}
    out: list[Section] = []

    # command
    if run.command:
        cmd = run.command.get("command") or shlex.join(run.command.get("argv", []))
        when = run.command.get("time", "")
        out.append(Section("command", "Command", True,
                           f"<pre><code>{html.escape(cmd)}</code></pre><p class=muted>run "
                           f"{html.escape(when)} in <code>{html.escape(run.command.get('cwd', ''))}"
                           f"</code> (torch {html.escape(str(run.command.get('torch', '?')))})"
                           "</p>",
                           f"```bash\n{cmd}\n```\n\nrun {when} in `{run.command.get('cwd', '')}`\n"))
    elif cfg:
        try:
            cmd = reconstructed_command(cfg)
        except HawqError as e:  # a config today's checks reject: say so, never fail the report
            cmd = f"# metrics.json's config does not rebuild as a command: {e}"
        out.append(Section("command", "Command", False,
                           f"<p class=nc>The run did not record its command line (command.json);"
                           f" an equivalent command rebuilt from metrics.json:</p><pre><code>"
                           f"{html.escape(cmd)}</code></pre>",
                           f"Command line {NOT_COMPUTED} (no command.json); equivalent command "
                           f"rebuilt from metrics.json:\n\n```bash\n{cmd}\n```\n"))
    else:
        h, md = _nc("no command.json or metrics.json in the run directory")
        out.append(Section("command", "Command", False, h, md))

    # summary
    if m:
        b = m.get("budget") or {}
        fp32_acc, acc = m.get("fp32_accuracy"), m.get("accuracy")
        delta = None if fp32_acc is None or acc is None else 100 * (acc - fp32_acc)
        metric = m.get("metric") or "accuracy"  # the task's metric: perplexity, cosine, loss...
        uni = m.get("uniform") or {}
        if metric == "accuracy":
            head, fmt, dtext = "Top-1", _pct, "–" if delta is None else f"{delta:+.2f} points"
            fp32_acc = m.get("fp32_value", fp32_acc) if fp32_acc is None else fp32_acc
            acc = m.get("value", acc) if acc is None else acc
        else:
            fp32_acc, acc = m.get("fp32_value"), m.get("value")
            better = "higher" if (m.get("task") or {}).get("higher_is_better") else "lower"
            head, fmt = metric.capitalize(), _fmt_num
            dtext = ("–" if fp32_acc is None or acc is None
                     else f"{acc - fp32_acc:+.4g} ({better} is better)")
        if uni.get("value") is not None:
            dtext += f"; uniform {uni.get('w_bits')}-bit: {fmt(uni['value'])}"
        fp32_bytes, size = b.get("fp32_bytes"), b.get("size_bytes")
        bops, fbops = b.get("bops"), b.get("fp32_bops")
        cards = [
            (head, f"{fmt(fp32_acc)} &#8594; <b>{fmt(acc)}</b>", html.escape(dtext)),
            ("Model size", f"{_bytes(fp32_bytes)} &#8594; <b>{_bytes(size)}</b>",
             f"{_fmt_num(b.get('compression'), 3)}x smaller (weights "
             f"{_fmt_num(b.get('weight_compression'), 3)}x)"),
            ("Weight bits", f"32 &#8594; <b>{_fmt_num(b.get('avg_bits'), 3)}</b> avg",
             f"activations {cfg.get('a_bits', '–')}-bit"),
            ("BOPs", f"{_fmt_num(None if fbops is None else fbops / 1e9, 4)} G &#8594; "
                     f"<b>{_fmt_num(None if bops is None else bops / 1e9, 4)} G</b>",
             "–" if not bops or not fbops else f"{fbops / bops:.1f}x fewer"),
        ]
        card_html = "".join(f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div>'
                            f'<div class="s">{s}</div></div>' for k, v, s in cards)
        rows = [["top-1 accuracy" if metric == "accuracy" else metric, fmt(fp32_acc), fmt(acc)],
                ["model size", _bytes(fp32_bytes), _bytes(size)],
                ["weight bits (avg)", "32", _fmt_num(b.get("avg_bits"), 4)],
                ["BOPs (G)", _fmt_num(None if fbops is None else fbops / 1e9),
                 _fmt_num(None if bops is None else bops / 1e9)],
                ["MACs per sample", _fmt_num(b.get("macs")), _fmt_num(b.get("macs"))]]
        header = ["", "FP32", "quantized"]
        if uni:  # the uniform plan of the same size, measured by the run
            header.append(f"uniform {uni.get('w_bits')}-bit (same size)")
            for r, v in zip(rows, [fmt(uni.get("value")), _bytes(uni.get("size_bytes")),
                                   _fmt_num(uni.get("w_bits")), "–", _fmt_num(b.get("macs"))]):
                r.append(v)
        th, tm = _table(header, rows, set(range(1, len(header))))
        secs = m.get("seconds") or {}
        alloc = m.get("allocation") or {}
        info = (f"model <code>{html.escape(str(cfg.get('model')))}</code>, sensitivity "
                f"<code>{html.escape(str(cfg.get('sensitivity')))}</code>, allocator "
                f"<code>{html.escape(str(cfg.get('allocator')))}</code> "
                f"({html.escape(str(alloc.get('method', '')))}"
                f"{', optimal' if alloc.get('optimal') else ''}), candidate bits "
                f"{html.escape(str(cfg.get('bits')))}, {b.get('total_params', 0):,} parameters"
                f"; time {sum(secs.values()):.1f} s")
        out.append(Section("summary", "Accuracy, size and BOPs: before and after", True,
                           f'<p>{info}</p><div class="cards">{card_html}</div>{th}',
                           f"{_strip(info)}\n\n{tm}"))
    else:
        h, md = _nc("metrics.json is missing", "run 'hawq compress --out DIR'")
        out.append(Section("summary", "Accuracy, size and BOPs: before and after", False, h, md))

    # per-layer table
    rows_m = m.get("layers") or []
    if rows_m:
        rows = []
        for i, r in enumerate(rows_m):
            tr = r.get("trace")
            se = r.get("stderr")
            trace = "–" if tr is None else (f"{tr:.4g} ± {se:.2g}" if se is not None
                                            else f"{tr:.4g}")
            eig = r.get("eigenvalue")
            eig = eig[0] if isinstance(eig, list) and eig else eig
            wb = r.get("w_bits")
            badge = (f'<span class="b" style="background:{_colour(_mean_bits(wb))}">'
                     f'{html.escape(_fmt_bits(wb))}</span>')
            rows.append([str(i), html.escape(r.get("name", "")), html.escape(r.get("type", "")),
                         _fmt_num(r.get("params")), _fmt_num(r.get("macs")), html.escape(trace),
                         _fmt_num(r.get("avg_trace")),
                         _fmt_num(eig) if eig is not None else NOT_COMPUTED, badge,
                         html.escape(str(r.get("a_bits", "–")))])
        th, tm = _table(["#", "layer", "type", "params", "MACs", "trace ± stderr",
                         "avg trace", "top eigenvalue", "w bits", "a bits"], rows,
                        {0, 3, 4, 5, 6, 7, 9}, raw_html=True)
        out.append(Section("layers", "Per-layer sensitivity and bits", True,
                           bits_svg(rows_m) + th, tm))
    else:
        h, md = _nc("no per-layer rows (metrics.json missing)")
        out.append(Section("layers", "Per-layer sensitivity and bits", False, h, md))

    # plots
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

    # density
    if run.density and "density.png" in run.images:
        d = run.density
        text = (f"SLQ over {d.get('dim', 0):,} weights, {d.get('hvp_count', 0)} Hessian-vector "
                f"products, {float(d.get('seconds', 0)):.1f} s")
        link = md_images.get("density.png")
        out.append(Section("density", "Hessian eigenvalue density", True,
                           _img("density.png", run.images["density.png"], "eigenvalue density")
                           + f"<p class=muted>{html.escape(text)}</p>",
                           (f"![eigenvalue density]({link})\n\n" if link else "") + text + "\n"))
    else:
        h, md = _nc("the Hessian eigenvalue density", "run 'hawq report DIR --density'")
        out.append(Section("density", "Hessian eigenvalue density", False, h, md))

    # fine-tuning
    ft = run.finetune
    if ft:
        hist = (ft.get("finetune") or {}).get("history") or []
        rows = [[str(h.get("epoch")), _fmt_num(h.get("loss")), _pct(h.get("train_accuracy")),
                 _fmt_num(h.get("seconds"), 3)] for h in hist]
        th, tm = _table(["epoch", "loss", "train top-1", "seconds"], rows, {0, 1, 2, 3})
        txt = (f"FP32 {_pct(ft.get('fp32_accuracy'))}, post-training "
               f"{_pct(ft.get('ptq_accuracy'))}, after fine-tuning {_pct(ft.get('accuracy'))}")
        out.append(Section("finetune", "Fine-tuning", True, f"<p>{txt}</p>{th}", txt + "\n\n" + tm))
    else:
        h, md = _nc("no fine-tuning in this run", "use 'hawq compress --finetune EPOCHS'")
        out.append(Section("finetune", "Fine-tuning", False, h, md))

    # packed export
    ex = run.export
    if ex:
        s = ex.get("sizes") or {}
        rows = [["accounted size (budget_report)", _bytes(s.get("accounted_bytes"))],
                ["stored payload (packed weights + float params)", _bytes(s.get("payload_bytes"))],
                ["tensor file", _bytes(s.get("file_bytes"))],
                ["scales / zero points / bit lists", _bytes(s.get("quant_meta_bytes"))],
                ["buffers (BN statistics, activation ranges)", _bytes(s.get("buffer_bytes"))],
                ["safetensors header", _bytes(s.get("header_bytes"))]]
        th, tm = _table(["", "bytes"], rows, {1})
        out.append(Section("export", "Packed integer export", True, th, tm))
    else:
        h, md = _nc("no packed export in the run directory", "run 'hawq export --run DIR'")
        out.append(Section("export", "Packed integer export", False, h, md))

    if run.problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in run.problems)
        out.append(Section("problems", "Files that could not be used", True,
                           f"<ul>{items}</ul>",
                           "".join(f"- {p}\n" for p in run.problems)))
    return out


def _strip(s: str) -> str:
    import re

    return html.unescape(re.sub(r"<[^>]+>", "`", s).replace("``", "`"))


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
    m = run.metrics or {}
    model = (m.get("config") or {}).get("model", "unknown model")
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
    model = ((run.metrics or {}).get("config") or {}).get("model", "unknown model")
    parts = [f"# hawq report: {model}\n", f"Run directory: `{os.path.abspath(run.run_dir)}`\n"]
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


def compute_density(run_dir: str | os.PathLike, *, samples: int = 256, n_steps: int = 40,
                    n_vectors: int = 1, progress: bool = False) -> Path:
    """Compute the SLQ Hessian eigenvalue density of the run's FP32 model on ``samples``
    training samples (the run's model, data dir and seed from metrics.json) and write
    ``density.json`` into the run directory. Cost: n_vectors * n_steps Hessian-vector
    products (see :func:`hawq.analysis.hessian_density.spectral_density`)."""
    from hawq.feed.data import load_dataset
    from hawq.analysis.hessian_density import spectral_density
    from hawq.modules.models import MODELS, build_model, get_spec

    run = load_run(run_dir)
    cfg = (run.metrics or {}).get("config")
    if not cfg:
        raise DataError(f"{run_dir}: metrics.json is missing, so the model is unknown; run "
                        "'hawq compress --out DIR' first")
    name, task = cfg["model"], cfg.get("task")
    if name in MODELS and not cfg.get("data"):
        spec = get_spec(name)
        model = build_model(name, pretrained=True, data_dir=cfg.get("data_dir"))
        data = load_dataset(spec.dataset, "train", cfg.get("data_dir"), samples).tensors
    else:  # the user's model / data, by the specs the run recorded
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
    res = spectral_density(model, data, n_steps=n_steps, n_vectors=n_vectors,
                           seed=int(cfg.get("seed", 0)), progress=progress, task=task)
    return write_json(Path(run_dir) / "density.json", res.to_dict() | {"samples": samples})
