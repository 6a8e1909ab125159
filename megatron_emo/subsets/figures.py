"""Figures (matplotlib, Agg backend) and the one-page ``report.html`` of the modularity report."""

from __future__ import annotations

import html
import os

__all__ = ["write_figures_and_html"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _usage_figure(report: dict, key: str, title: str, path: str) -> None:
    import numpy as np

    plt = _plt()
    domains, n_layers = report["domains"], report["num_layers"]
    height = 0.9 + n_layers * (0.35 * len(domains) + 0.8)
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, height), squeeze=False)
    for layer in range(n_layers):
        ax = axes[layer][0]
        data = np.array([report[key][d][layer] for d in domains])
        im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(domains)), domains, fontsize=7)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(axis="x", labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[-1][0].set_xlabel("routed expert")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _overlap_figure(report: dict, path: str) -> None:
    import numpy as np

    plt = _plt()
    domains, n_layers = report["domains"], report["num_layers"]
    cols = min(4, n_layers + 1)
    rows = -(-(n_layers + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    mats = report["overlap_jaccard"] + [report["overlap_jaccard_mean"]]
    for i, ax in enumerate(axes.flat):
        if i >= len(mats):
            ax.axis("off")
            continue
        m = np.array(mats[i])
        ax.imshow(m, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(domains)), domains, rotation=45, fontsize=6)
        ax.set_yticks(range(len(domains)), domains, fontsize=6)
        ax.set_title("mean over layers" if i == n_layers else f"layer {i}", fontsize=8)
        if len(domains) <= 8:
            for a in range(len(domains)):
                for b in range(len(domains)):
                    ax.text(b, a, f"{m[a, b]:.2f}", ha="center", va="center", fontsize=6,
                            color="w" if m[a, b] < 0.6 else "k")
    fig.suptitle("Jaccard overlap of per-domain top-25% expert sets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _lines_figure(report: dict, path_spec: str, path_loss: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d in report["domains"]:
        ax.plot(range(report["num_layers"]), report["specialisation"][d], marker="o", label=d)
    ax.axhline(report["top_share"], color="gray", ls=":", label="uniform routing")
    ax.set_xlabel("layer")
    ax.set_ylabel("routing mass in top 25% experts")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_spec, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d in report["domains"]:
        loss = report["losses"][d]
        xs = [s["fraction"] for s in loss["subsets"]] + [1.0]
        ys = [s["loss"] for s in loss["subsets"]] + [loss["full_loss"]]
        ax.plot(xs, ys, marker="o", label=d)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fraction of experts kept (own-domain subset)")
    ax.set_ylabel("held-out next-token loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_loss, dpi=90)
    plt.close(fig)


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


def write_figures_and_html(report: dict, output_dir: str) -> list[str]:
    """Writes the PNG figures and ``report.html`` (figures linked by relative name).

    Returns:
        The figure file names.
    """
    figs = {"usage_mean_prob.png": "Mean routed probability per expert (selection halves)",
            "usage_topk_share.png": "Share of routed top-k slots per expert (selection halves)",
            "overlap_jaccard.png": "Expert overlap between domains",
            "specialisation.png": "Specialisation per layer",
            "subset_loss.png": "Held-out loss of own-domain subsets"}
    _usage_figure(report, "usage_mean_prob", list(figs.values())[0],
                  os.path.join(output_dir, "usage_mean_prob.png"))
    _usage_figure(report, "usage_topk_share", list(figs.values())[1],
                  os.path.join(output_dir, "usage_topk_share.png"))
    _overlap_figure(report, os.path.join(output_dir, "overlap_jaccard.png"))
    _lines_figure(report, os.path.join(output_dir, "specialisation.png"),
                  os.path.join(output_dir, "subset_loss.png"))
    domains = report["domains"]
    fr = report["fractions"]
    loss_rows = []
    for d in domains:
        loss = report["losses"][d]
        with_random = [v for s in loss["subsets"] for v in (s["loss"], s.get("loss_random"))]
        loss_rows.append([d, report["documents"][d]["heldout_predicted_tokens"], loss["full_loss"]]
                         + ["-" if v is None else v for v in with_random])
    keep_hdr = [f"{h} {f:g} (keep "
                f"{report['losses'][domains[0]]['subsets'][i]['keep_per_layer'][0]})"
                for i, f in enumerate(fr) for h in ("own", "random")]
    spec_rows = [[d] + report["specialisation"][d]
                 + [sum(report["specialisation"][d]) / report["num_layers"]] for d in domains]
    ov_rows = [[d] + report["overlap_jaccard_mean"][a] for a, d in enumerate(domains)]
    src = report["source"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>EMO modularity report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
        "collapse;margin:8px 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "img{max-width:100%}</style></head><body>",
        "<h1>EMO modularity report</h1>",
        f"<p>checkpoint: {html.escape(str(src.get('checkpoint')))}<br>corpus: "
        f"{html.escape(str(src.get('data_prefix')))}<br>layers {report['num_layers']}, experts "
        f"per layer {report['num_experts_per_layer']} (shared {report['num_shared_experts']}), "
        f"selection method {html.escape(report['method'])}; max docs per domain "
        f"{src.get('max_docs_per_domain')}, max tokens per document {src.get('max_tokens')}</p>",
        "<h2>Subset quality: held-out next-token loss (nats)</h2>",
        "<p>Each domain's subset is selected on its selection half and evaluated on its held-out "
        "half; keep counts include the shared expert(s). The random columns average "
        f"{report.get('num_random', 0)} random subsets of the same size (the baseline).</p>",
        _table(["domain", "tokens", "full"] + keep_hdr, loss_rows),
        "<img src='subset_loss.png'>",
        "<h2>Specialisation: routing mass in the domain's top 25% experts</h2>",
        _table(["domain"] + [f"layer {i}" for i in range(report["num_layers"])] + ["mean"],
               spec_rows),
        "<img src='specialisation.png'>",
        "<h2>Expert overlap between domains (Jaccard of top-25% sets, mean over layers)</h2>",
        _table(["domain"] + domains, ov_rows),
        "<img src='overlap_jaccard.png'>",
        "<h2>Expert usage per domain</h2>",
        "<img src='usage_mean_prob.png'>",
        "<img src='usage_topk_share.png'>",
        "<p>All numbers: report.json</p></body></html>",
    ]
    with open(os.path.join(output_dir, "report.html"), "w") as f:
        f.write("\n".join(parts))
    return list(figs)
