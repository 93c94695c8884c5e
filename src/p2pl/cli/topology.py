"""``p2pl topology``: degree statistics, diameter and spectral gap of W; optional PNG drawing."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pl.cli.common import add_config_arguments, config_from_args, writable_file
from p2pl.config import TopologyConfig


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    parser = sub.add_parser("topology", help="describe the device graph of a config (and draw it)")
    add_config_arguments(parser)
    parser.add_argument("--png", type=Path, help="save a drawing of the graph to this PNG file")
    parser.set_defaults(func=main)


def radius_note(cfg: TopologyConfig, radius: float | None) -> str:
    """How the random geometric graph's link range was chosen, for the first output line."""
    if radius is None:
        return ""
    if cfg.area_m > 0:
        return f", range {radius:g} m in a {cfg.area_m:g} m square"
    if cfg.radius == 0:
        return f", radius {radius:.4g} (automatic: chosen from the number of devices to keep the graph connected)"
    return f", radius {radius:g}"


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    png = writable_file(args.png, "--png") if args.png else None
    # networkx / scipy only once the arguments are good; no torch unless data sizes are needed.
    from p2pl.graph.stats import format_stats, graph_stats
    from p2pl.graph.topology import build_topology
    from p2pl.graph.weights import mixing_weights

    topology = build_topology(cfg.topology, cfg.devices, cfg.seed)
    sizes = None
    if cfg.consensus.weights == "data-size":
        from p2pl.experiment import build_experiment

        sizes = build_experiment(cfg).setting.data_sizes
    weights = mixing_weights(cfg.devices, topology.edges, cfg.consensus.weights, sizes)
    print(f"topology {topology.name}{radius_note(cfg.topology, topology.radius)}, weights {cfg.consensus.weights}")
    print(format_stats(graph_stats(topology, weights)))
    if topology.arcs is not None and topology.ranges is not None:  # one-way links: the stats above are of both ways
        arcs = {tuple(a) for a in topology.arcs.tolist()}
        one_way = sum((v, u) not in arcs for u, v in arcs)
        reach = topology.ranges
        print(f"one-way       {len(arcs)} arcs, {one_way} without the reverse; radio ranges "
              f"{reach.min():.4g}-{reach.max():.4g} (statistics above: links either way)")  # fmt: skip
    if png is not None:
        # Imported here: matplotlib costs ~1.5 s of CPU at every ``p2pl`` start otherwise.
        from p2pl.graph.draw import draw_topology

        draw_topology(topology, png, title=f"{topology.name}, {cfg.devices} devices")
        print(f"drawing saved to {png}")
    return 0
