"""The benchmark report: report.md and report.html with the methods x metrics table laid out as UnlearnCanvas'
paper lays it out (style unlearning UA / IRA / CRA, object unlearning UA / IRA / CRA, FID, time, memory, storage),
the per-edit rows below it, and matplotlib plots: UA against retain accuracy, per-concept heatmaps, and a
before/after grid per method."""

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
    figures = write_plots(results, plots) + write_grids(results, plots, image_path)
    main_table, edits = table_rows(results), edit_rows(results)
    md = [f"# {results['benchmark']} benchmark", "", summary(results), "", markdown_table(*main_table), "",
          "## Per edit", "", markdown_table(*edits), ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in figures]
    _write(out / "report.md", "\n".join(md) + "\n")
    _write(out / "report.html", html_report(results, main_table, edits, figures))


def html_report(results: dict, main_table, edits, figures: list[Path]) -> str:
    def table(header, body):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    # UnlearnCanvas' table groups the columns under "Style Unlearning" and "Object Unlearning".
    header, body = main_table
    group = ("<tr><th></th><th colspan=3>Style Unlearning</th><th colspan=3>Object Unlearning</th>"
             "<th colspan=4>Cost and quality</th></tr>")
    grouped = table(header, body).replace("<thead>", "<thead>" + group, 1)
    images = "".join(f'<figure><img src="plots/{p.name}"><figcaption>{p.stem}</figcaption></figure>' for p in figures)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #999;padding:4px 8px;text-align:right}img{max-width:900px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{results['benchmark']} benchmark</title>"
            f"<style>{style}</style></head><body><h1>{results['benchmark']} benchmark</h1>"
            f"<p>{html.escape(summary(results))}</p>{grouped}<h2>Per edit</h2>{table(*edits)}{images}</body></html>")


def write_plots(results: dict, plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = [r for r in results["rows"] if r["method"] != "base"]
    written = []
    figure, axes = plt.subplots(figsize=(6, 4.5))
    markers = {"object": "o", "style": "s"}
    for method in dict.fromkeys(r["method"] for r in edits):
        for kind in ("object", "style"):
            points = [(s["UA"], _mean_retain(s)) for r in edits if r["method"] == method and r["kind"] == kind
                      for s in r["per_concept"].values() if s["UA"] is not None]
            if points:
                axes.scatter(*zip(*points), marker=markers[kind], label=f"{method} ({kind})")
    axes.set_xlabel("UA (unlearning accuracy)")
    axes.set_ylabel("retain accuracy (mean of IRA and CRA)")
    axes.set_xlim(-0.05, 1.05)
    axes.set_ylim(-0.05, 1.05)
    axes.grid(alpha=0.3)
    if edits:
        axes.legend(fontsize=7)
    figure.tight_layout()
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


def _mean_retain(scores: dict) -> float:
    values = [scores[m] for m in ("IRA", "CRA") if scores[m] is not None]
    return sum(values) / len(values) if values else float("nan")


def write_grids(results: dict, plots: Path, image_path: Callable[[str, str], Path], per_side: int = 8) -> list[Path]:
    """Per method: for each of its edits, base (top) and edited (bottom) images of the erased concept's prompts,
    then as many unrelated prompts, same seeds."""
    written = []
    seed = results["seeds"][0]
    edits = [r for r in results["rows"] if r["method"] != "base" and not r.get("failed")]  # a failed edit: no grid
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
