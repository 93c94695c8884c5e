"""What the robustness grid runs: scenarios (an attack and a sync mode) x aggregation rules.

A scenario is one row of the report: the attack-free run, the sync hijack under verified and
under the paper's flooding sync, and every other attack under the default (verified) sync. Each
scenario runs once per aggregation rule, on one base config: the user's config and ``--set``
overrides, with 10 % of the devices attacking when the config names no attackers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from p2pl.config import AGGREGATIONS, ExperimentConfig, load_config
from p2pl.core.adversary import DEFAULT_SCALE
from p2pl.errors import P2PLError, choose

#: Share of attackers when the config names none (``adversary.fraction`` and ``count`` both 0).
DEFAULT_FRACTION = 0.1
#: ``--quick``: fewer devices and rounds (the automatic radio range keeps 40 devices connected).
QUICK_OVERRIDES = ("devices=40", "rounds=12")
NO_ATTACK = "none"


@dataclass(frozen=True)
class Scenario:
    key: str  # folder name and results.csv value
    attack: str  # adversary.attack
    sync_mode: str  # sync.mode
    label: str  # for the report

    def describe_scale(self) -> str:
        default = DEFAULT_SCALE[self.attack]
        return f"{default:g}" if default else "-"


SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario(NO_ATTACK, "none", "verified", "no attack"),
        Scenario("sync-hijack-verified", "sync-hijack", "verified", "sync hijack, verified sync"),
        Scenario("sync-hijack-flood", "sync-hijack", "flood", "sync hijack, flooding sync (paper)"),
        Scenario("scale", "scale", "verified", "scaling"),
        Scenario("sign-flip", "sign-flip", "verified", "sign flip"),
        Scenario("gaussian", "gaussian", "verified", "gaussian noise"),
        Scenario("alie", "alie", "verified", "ALIE"),
        Scenario("label-flip", "label-flip", "verified", "label flip"),
        Scenario("silent", "silent", "verified", "silent"),
        Scenario("data-size", "data-size", "verified", "data-size lie"),
    )
}
#: The default rows. ``data-size`` only moves ``consensus.weights = "data-size"`` rows of W, so it
#: is left out unless asked for (``--attacks``) on a config with those weights.
DEFAULT_SCENARIOS = tuple(k for k in SCENARIOS if k != "data-size")
RULES = AGGREGATIONS


@dataclass(frozen=True)
class RunSpec:
    scenario: Scenario
    rule: str

    @property
    def key(self) -> str:
        """The run's folder under ``runs/``."""
        return f"{self.scenario.key}/{self.rule}"


@dataclass(frozen=True)
class GridSettings:
    base: ExperimentConfig  # every run's config before the grid sets attack, rule and sync mode
    scenarios: tuple[Scenario, ...]
    rules: tuple[str, ...]
    quick: bool = False
    command: str = "p2pl robustness"  # how the grid was asked for, for the report

    def specs(self) -> list[RunSpec]:
        return [RunSpec(s, r) for s in self.scenarios for r in self.rules]

    def config(self, spec: RunSpec) -> ExperimentConfig:
        cfg = self.base
        return replace(
            cfg,
            adversary=replace(cfg.adversary, attack=spec.scenario.attack),
            consensus=replace(cfg.consensus, aggregation=spec.rule),
            sync=replace(cfg.sync, mode=spec.scenario.sync_mode),
            output=replace(cfg.output, progress=False),
        )


#: Names ``--attacks`` accepts for several rows at once.
ALIASES = {"sync-hijack": ("sync-hijack-verified", "sync-hijack-flood")}


def _names(kind: str, text: str | None, valid: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    if not text:
        return default
    given = [n.strip() for n in text.split(",") if n.strip()]
    names = tuple(dict.fromkeys(m for n in given for m in ALIASES.get(n, (n,))))
    if not names:
        raise P2PLError(f"--{kind} needs at least one name from: {', '.join(valid)}")
    for name in names:
        choose(kind.rstrip("s"), name, valid)
    return names


def grid_settings(
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    quick: bool = False,
    attacks: str | None = None,
    rules: str | None = None,
    command: str = "p2pl robustness",
) -> GridSettings:
    """The grid for a config file and ``--set`` overrides (``--quick`` sizes come first, so a
    ``--set`` still wins); ``attacks`` / ``rules`` are comma-separated subsets (``sync-hijack``
    names both of its rows). The attack-free
    row is always run: every other row is read against it."""
    base = load_config(config, [*(QUICK_OVERRIDES if quick else ()), *overrides])
    if base.algorithm != "p2pl":
        raise P2PLError(f"the robustness grid runs P2PL's gossip, not algorithm {base.algorithm!r}; "
                        "drop the algorithm setting")  # fmt: skip
    if base.adversary.fraction == 0 and base.adversary.count == 0:
        base = replace(base, adversary=replace(base.adversary, fraction=DEFAULT_FRACTION))
    adv = base.adversary
    if adv.count == 0 and int(adv.fraction * base.devices + 1e-9) == 0:  # rounded down, as the placement does
        raise P2PLError(f"adversary.fraction {adv.fraction:g} of {base.devices} devices is no attacker; "
                        "raise it or set adversary.count, e.g. --set adversary.count=1")  # fmt: skip
    scenario_keys = _names("attacks", attacks, tuple(SCENARIOS), DEFAULT_SCENARIOS)
    chosen = {NO_ATTACK, *scenario_keys}
    rows = tuple(s for k, s in SCENARIOS.items() if k in chosen)  # the report's row order, whatever was typed
    chosen_rules = _names("rules", rules, RULES, RULES)
    return GridSettings(base, rows, tuple(r for r in RULES if r in chosen_rules), quick, command)


__all__ = [
    "ALIASES",
    "DEFAULT_FRACTION",
    "DEFAULT_SCENARIOS",
    "NO_ATTACK",
    "QUICK_OVERRIDES",
    "RULES",
    "SCENARIOS",
    "GridSettings",
    "RunSpec",
    "Scenario",
    "grid_settings",
]
