"""Draw a topology to a PNG (headless, atomic write)."""

from __future__ import annotations

import io
from pathlib import Path

import networkx as nx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from p2pl import atomic
from p2pl.graph.topology import Topology


def draw_topology(topology: Topology, path: Path, title: str = "") -> None:
    """Save a picture of ``topology`` to ``path`` (PNG): real positions if any, else a spring layout."""
    path = Path(path)
    graph = topology.graph
    n = topology.num_devices
    if topology.positions is not None:
        pos = {i: (float(x), float(y)) for i, (x, y) in enumerate(np.asarray(topology.positions)[:, :2])}
    else:
        # Fewer iterations on big graphs: the layout is only a picture, not worth minutes.
        pos = nx.spring_layout(graph, seed=0, iterations=50 if n <= 1000 else 15)

    # Object API + Agg canvas: no pyplot global state, safe off the main thread and without a display.
    fig = Figure(figsize=(6, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    node_size = float(np.clip(3000.0 / max(n, 1), 2.0, 120.0))
    edge_alpha = 0.6 if graph.number_of_edges() <= 2000 else 0.15
    nx.draw_networkx_edges(graph, pos, ax=ax, width=0.6, alpha=edge_alpha, edge_color="#555555")
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_size=node_size, node_color="#1f77b4", linewidths=0)
    if n <= 40:
        nx.draw_networkx_labels(graph, pos, ax=ax, font_size=7, font_color="white")
    ax.set_aspect("equal")
    if topology.positions is None:
        ax.set_axis_off()  # spring coordinates mean nothing
    else:  # real positions (unit square or metres): networkx hid the tick labels, show them again
        ax.tick_params(left=True, bottom=True, labelleft=True, labelbottom=True)
    ax.set_title(title or f"{topology.name}: {n} devices, {graph.number_of_edges()} links")
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic.write_bytes(path, buffer.getvalue())
