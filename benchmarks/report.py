"""The benchmark report: report.md and report.html with the methods x metrics table laid out as UnlearnCanvas'
paper lays it out (style unlearning UA / IRA / CRA, object unlearning UA / IRA / CRA, FID, time, memory, storage),
a --sequence's steps (UnlearnCanvas' sequential-unlearning table), the per-edit rows, and matplotlib plots: UA
against retain accuracy, per-concept heatmaps, a before/after grid per method, and a sequence's UA per step."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from benchmarks.figures import labelled_grid
from erasers.files import write_atomically

METRICS = ("UA", "IRA", "CRA")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


ROBUSTNESS = ("Each attack (--attacks) on each edit and on the base model at its toy defaults: its success rate (ASR, "
              "or a curve's last point, or the rate after quantization), the rate before it in brackets; n/a where "
              "the attack does not apply to the edit (benchmarks/README.md#attacks).")


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Method", *(f"{kind} {m} %" for kind in ("Style", "Object") for m in METRICS),
              f"FID ({(results.get('fid_features') or 'n/a').split(' ')[0]})", "Time s", "Memory GiB", "Storage MiB"]
    body = []
    for line in results["table"]:
        method = line["method"] + (f" ({line['failed']} failed)" if line.get("failed") else "")
        body.append([method, *(_pct(line[f"{kind}_{m}"]) for kind in ("style", "object") for m in METRICS),
                     _num(line["FID"], digits=2), _num(line["seconds"]), _num(line["peak_memory_bytes"], 2**30, 2),
                     _num(line["storage_bytes"], 2**20, 2)])
    return header, body


def edit_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Set", "Erased", "UA %", "IRA %", "CRA %", "object acc %", "style acc %", "FID"]
    body = []
    for row in results["rows"]:
        name = row["set"] + (f" (failed: {row['failed']})" if row.get("failed") else "")
        for concept, scores in row["per_concept"].items():
            body.append([name, concept, *(_pct(scores[m]) for m in METRICS),
                         _pct(row["accuracy"]["object"]), _pct(row["accuracy"]["style"]), _num(row["fid"], digits=2)])
    return header, body


def sequential_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """UnlearnCanvas' sequential-unlearning table (benchmarks.sequence): a row per method x step, the UA of each
    concept of the sequence (blank before that step erases it), and the step's IRA and CRA."""
    steps = [r for r in results["rows"] if "step" in r]
    concepts = list(dict.fromkeys(c for r in steps for c in r["sequence"]))
    header = ["Method", "Step", *(f"{c} UA %" for c in concepts), "IRA %", "CRA %"]
    methods = list(dict.fromkeys(r["method"] for r in steps))
    sequences = list(dict.fromkeys(tuple(r["sequence"]) for r in steps))  # merged runs may hold several
    body = []
    for row in sorted(steps, key=lambda r: (methods.index(r["method"]), sequences.index(tuple(r["sequence"])),
                                            r["step"])):
        scores = _only(row)
        each = row.get("UA_per_concept") or {row["concepts"][0]: scores["UA"]}
        method = row["method"] + (f" (failed: {row['failed']})" if row.get("failed") else "")
        body.append([method, str(row["step"]), *(_pct(each.get(c)) if c in row["concepts"] else "" for c in concepts),
                     _pct(scores["IRA"]), _pct(scores["CRA"])])
    return header, body


SEQUENTIAL = ("Sequential unlearning, as UnlearnCanvas': each method erases the sequence's concepts one after "
              "another, each step continuing from the step before. Per step, the UA of each concept erased so far "
              "(blank: not erased yet; a concept whose UA falls at a later step comes back), and IRA / CRA on the "
              "concepts not erased yet.")


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def summary(results: dict) -> str:
    sampling = results["sampling"]
    return (f"{results['benchmark']}: model {results['model']}, {len(results['styles'])} styles x "
            f"{len(results['objects'])} objects x seeds {results['seeds']} = {results['images_per_model']} images per "
            f"model; sampling steps {sampling['steps'] or 'default'}, guidance {sampling['guidance'] or 'default'}, "
            f"size {sampling['size'] or 'default'}, scheduler {sampling['scheduler']}. FID features: "
            f"{results.get('fid_features') or 'not computed'}. UA / IRA / CRA as UnlearnCanvas defines them, averaged "
            "over the erased concepts of each kind; the base row scores the base model against each erased concept. "
            "Time, memory and storage are the erase's (peak RSS on a CPU, peak allocated on a GPU).")


PLOTS = ("ua_vs_retain.png", "heatmap_UA.png", "heatmap_IRA.png", "heatmap_CRA.png")


def write_report(results: dict, out: Path, image_path: Callable[[str, str], Path]) -> None:
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    figures = write_plots(results, plots) + write_sequence_plot(results, plots) + write_grids(results, plots,
                                                                                              image_path)
    main_table, edits, sequential = table_rows(results), edit_rows(results), sequential_rows(results)
    md = [f"# {results['benchmark']} benchmark", "", summary(results), ""]
    if method_table_shown(results):
        md += [markdown_table(*main_table), ""]
    if sequential[1]:
        md += ["## Sequential", "", SEQUENTIAL, "", markdown_table(*sequential), ""]
    if results.get("robustness"):
        from benchmarks.bench_attacks import robustness_rows

        md += ["## Robustness", "", ROBUSTNESS, "", markdown_table(*robustness_rows(results)), ""]
    md += ["## Per edit", "", markdown_table(*edits), ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in figures]
    _write(out / "report.md", "\n".join(md) + "\n")
    _write(out / "report.html", html_report(results, main_table, edits, figures, sequential))


def main_tables(results: dict) -> str:
    """The method table and a --sequence's table, in markdown, as the bench commands print them."""
    sequential = sequential_rows(results)
    tables = ([table_rows(results)] if method_table_shown(results) else []) + ([sequential] if sequential[1] else [])
    if results.get("robustness"):
        from benchmarks.bench_attacks import robustness_rows

        tables.append(robustness_rows(results))
    return "\n\n".join(markdown_table(*table) for table in tables)


def method_table_shown(results: dict) -> bool:
    """The method table, unless a run of only a --sequence would leave it the base model's row alone."""
    return len(results["table"]) > 1 or not any("step" in row for row in results["rows"])


def html_report(results: dict, main_table, edits, figures: list[Path], sequential=None) -> str:
    from benchmarks.bench_attacks import robustness_rows

    def table(header, body):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    # UnlearnCanvas' table groups the columns under "Style Unlearning" and "Object Unlearning".
    header, body = main_table
    group = ("<tr><th></th><th colspan=3>Style Unlearning</th><th colspan=3>Object Unlearning</th>"
             "<th colspan=4>Cost and quality</th></tr>")
    grouped = table(header, body).replace("<thead>", "<thead>" + group, 1) if method_table_shown(results) else ""
    images = "".join(f'<figure><img src="plots/{p.name}"><figcaption>{p.stem}</figcaption></figure>' for p in figures)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #999;padding:4px 8px;text-align:right}img{max-width:900px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{results['benchmark']} benchmark</title>"
            f"<style>{style}</style></head><body><h1>{results['benchmark']} benchmark</h1>"
            f"<p>{html.escape(summary(results))}</p>{grouped}"
            + (f"<h2>Sequential</h2><p>{html.escape(SEQUENTIAL)}</p>{table(*sequential)}"
               if sequential and sequential[1] else "")
            + (f"<h2>Robustness</h2><p>{html.escape(ROBUSTNESS)}</p>{table(*robustness_rows(results))}"
               if results.get("robustness") else "")
            + f"<h2>Per edit</h2>{table(*edits)}{images}</body></html>")


def write_plots(results: dict, plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    edits = [r for r in results["rows"] if r["method"] != "base" and "step" not in r]  # steps: their own plot
    if not edits:
        return []
    written = []
    # One colour per method (tab20: the default cycle repeats after ten) and one marker per kind, the legend
    # beside the axes: with every method a legend inside covered the points.
    figure, axes = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    markers = {"object": "o", "style": "s"}
    colours = plt.get_cmap("tab20").colors
    handles = []
    for index, method in enumerate(dict.fromkeys(r["method"] for r in edits)):
        colour = colours[index % len(colours)]
        for kind in ("object", "style"):
            points = [(s["UA"], _mean_retain(s)) for r in edits if r["method"] == method and r["kind"] == kind
                      for s in r["per_concept"].values() if s["UA"] is not None]
            if points:
                axes.scatter(*zip(*points), marker=markers[kind], color=colour, alpha=0.8)
        handles.append(Line2D([], [], marker="o", linestyle="", color=colour, label=method))
    handles += [Line2D([], [], marker=marker, linestyle="", color="black", markerfacecolor="none", label=kind)
                for kind, marker in markers.items()]
    axes.set_xlabel("UA (unlearning accuracy)")
    axes.set_ylabel("retain accuracy (mean of IRA and CRA)")
    axes.set_xlim(-0.05, 1.05)
    axes.set_ylim(-0.05, 1.05)
    axes.grid(alpha=0.3)
    figure.legend(handles=handles, fontsize=7, loc="outside right upper")
    written.append(_save(figure, plots / "ua_vs_retain.png"))
    plt.close(figure)

    # Rows: the base model (its scores against each concept, for reference), then each method.
    methods = ["base", *dict.fromkeys(r["method"] for r in edits)]
    concepts = list(dict.fromkeys(c for r in edits for c in r["per_concept"]))
    for metric in METRICS:
        grid = [[next((s[metric] for r in results["rows"] if r["method"] == m for c2, s in r["per_concept"].items()
                       if c2 == c), None) for c in concepts] for m in methods]
        figure, axes = plt.subplots(figsize=(3 + 0.9 * len(concepts), 1.6 + 0.45 * len(methods)))
        values = [[float("nan") if v is None else v for v in row] for row in grid] or [[float("nan")]]
        image = axes.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axes.set_xticks(range(len(concepts)), concepts, rotation=45, ha="right")
        axes.set_yticks(range(len(methods)), methods)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None:
                    axes.text(j, i, f"{100 * v:.0f}", ha="center", va="center", color="white" if v < 0.6 else "black",
                              fontsize=8)
        axes.set_title(f"{metric} %")
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        written.append(_save(figure, plots / f"heatmap_{metric}.png"))
        plt.close(figure)
    return written


def write_sequence_plot(results: dict, plots: Path) -> list[Path]:
    """sequence_UA.png, for a run with a --sequence: per method, each concept's UA at every step from the one that
    erased it (a falling line: the concept comes back), and the steps' IRA and CRA dashed."""
    steps = [r for r in results["rows"] if "step" in r]
    if not steps:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in steps))
    figure, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.5), squeeze=False)
    for method, axis in zip(methods, axes[0]):
        mine = sorted((r for r in steps if r["method"] == method), key=lambda r: r["step"])
        for concept in dict.fromkeys(c for r in mine for c in r["concepts"]):
            points = [(r["step"], (r.get("UA_per_concept") or {concept: _only(r)["UA"]}).get(concept)) for r in mine
                      if concept in r["concepts"]]
            axis.plot(*zip(*[(x, float("nan") if y is None else y) for x, y in points]), marker="o", label=concept)
        for metric, line in (("IRA", "--"), ("CRA", ":")):
            values = [float("nan") if _only(r)[metric] is None else _only(r)[metric] for r in mine]
            axis.plot([r["step"] for r in mine], values, linestyle=line, color="grey", label=metric)
        axis.set_title(method)
        axis.set_xlabel("step")
        axis.set_ylim(-0.05, 1.05)
        axis.set_xticks([r["step"] for r in mine])
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("UA of each concept erased so far; IRA, CRA")
    figure.tight_layout()
    written = [_save(figure, plots / "sequence_UA.png")]
    plt.close(figure)
    return written


def _only(row: dict) -> dict:
    (scores,) = row["per_concept"].values()
    return scores


def _mean_retain(scores: dict) -> float:
    values = [scores[m] for m in ("IRA", "CRA") if scores[m] is not None]
    return sum(values) / len(values) if values else float("nan")


def write_grids(results: dict, plots: Path, image_path: Callable[[str, str], Path], per_side: int = 8) -> list[Path]:
    """Per method: for each of its edits, base (top) and edited (bottom) images of the erased concept's prompts,
    then as many unrelated prompts, same seeds."""
    written = []
    seed = results["seeds"][0]
    # A failed edit has no grid; a --sequence's steps have their plot (write_sequence_plot).
    edits = [r for r in results["rows"] if r["method"] != "base" and not r.get("failed") and "step" not in r]
    for method in dict.fromkeys(r["method"] for r in edits):
        rows, labels, columns = [], [], 0
        for row in (r for r in edits if r["method"] == method):
            concept, kind = row["concepts"][0], row["kind"]
            other_kind = results["styles"] if kind == "object" else results["objects"]
            own = [(concept, x) if kind == "object" else (x, concept) for x in other_kind][:per_side]
            unrelated = [(o, s) for s in results["styles"] for o in results["objects"]
                         if concept not in (o, s)][::7][:per_side]
            keys = [f"{s}_{o}_seed{seed}" for o, s in own + unrelated]
            columns = len(keys)
            for set_name in ("base", row["set"]):
                rows += [Image.open(image_path(set_name, k)).convert("RGB").resize((64, 64), Image.NEAREST)
                         for k in keys]
                labels.append(f"{set_name}")
        if rows:
            grid = labelled_grid(rows, columns, labels)
            written.append(plots / f"grid_{method}.png")
            grid.save(written[-1])
    return written


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def _write(path: Path, text: str) -> None:
    write_atomically(path, text)
