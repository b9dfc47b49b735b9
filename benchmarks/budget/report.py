"""The report of the budget benchmark: Markdown tables from the rows of ``budget.py`` (the
budgets, the rate sweep, the methods that cannot fit, every method at its chosen rate,
paired per-seed differences against ``lora+gc`` and the full-parameter peers at equal steps
and at equal CPU time, the same for the QLoRA methods against ``qlora+gc`` inside the QLoRA
budget, progress per step, the gap over training, finals at other rates) and the curves of
test loss against steps and CPU time.

Equal CPU time: the shorter run's total CPU time, the other run's test loss linearly
interpolated between its eval points there (:func:`at_time`, :func:`equal_time_gap`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ..benchkit.protocol import ProtocolMismatch
from ..benchkit.report import markdown_table, mean_range
from .methods import BASELINE, METHODS, PEERS, QLORA_BASELINE, Method, budget_of, reference
from .plan import chosen_lrs, final_runs

MIB = 2**20
#: The final runs at the chosen rates by (method, seed).
Runs = dict[tuple[str, int], dict[str, Any]]


def protocol_of(row: dict[str, Any]) -> dict[str, Hashable]:
    """The protocol fields of a row (:mod:`benchmarks.benchkit.protocol`): a run's rate
    schedule (its warm-up under a decaying one), its length (a final run's; a sweep's may
    be shorter, :func:`sweep_section` refuses two lengths), batch, sequence length, model,
    device and the budget it ran in (``budget:<baseline>``); a budget row's shape and bytes;
    a fit row's budget. Budget and fit rows carry no schedule: every schedule shares them.

    Example:
        >>> protocol_of({"phase": "final", "method": "lora+gc", "steps": 200, "batch_size": 4,
        ...              "seq_len": 128, "model": "m", "device": "cpu", "budget_bytes": 9})
        ... # doctest: +NORMALIZE_WHITESPACE
        {'schedule': 'constant', 'steps': 200, 'batch_size': 4, 'seq_len': 128,
         'model': 'm', 'device': 'cpu', 'budget:lora+gc': 9}
    """
    phase = row.get("phase")
    if phase in ("sweep", "final"):
        schedule = row.get("schedule", "constant")  # rows from before schedules: constant
        fields: dict[str, Hashable] = {"schedule": schedule}
        if schedule != "constant":
            fields["warmup"] = row["warmup"]
        if phase == "final":
            fields["steps"] = row["steps"]
        fields.update({k: row[k] for k in ("batch_size", "seq_len", "model", "device")})
        if row.get("budget_bytes") is not None:
            fields[f"budget:{budget_of(row['method'])}"] = row["budget_bytes"]
        return fields
    if phase == "budget":
        return {**{k: row[k] for k in ("batch_size", "seq_len", "model", "device")},
                f"budget:{row.get('budget_of', BASELINE)}": row["budget_bytes"]}
    if phase == "fit":
        of = row.get("budget_of") or budget_of(row["method"])
        return {"device": row["device"], f"budget:{of}": row["budget_bytes"]}
    return {}


def run_of(row: dict[str, Any]) -> tuple[str, str, float, int] | None:
    """A sweep or final run's name, (phase, method, lr, seed); None for the other rows."""
    if row.get("phase") in ("sweep", "final"):
        return row["phase"], row["method"], row["lr"], row["seed"]
    return None


def at_time(run: dict[str, Any], seconds: float, split: str = "test") -> float:
    """The ``split`` loss at ``seconds`` of training CPU time, linearly interpolated
    between eval points (NaN past the run's end).

    Example:
        >>> run = {"cpu_seconds": [1.0, 1.0], "evals": [{"step": 0, "test": 4.0},
        ...                                               {"step": 2, "test": 3.0}]}
        >>> at_time(run, 1.0)
        3.5
    """
    clock = [0.0]
    for s in run["cpu_seconds"]:
        clock.append(clock[-1] + s)
    points = [(clock[e["step"]], e[split]) for e in run["evals"] if split in e]
    for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / (t1 - t0) if t1 > t0 else v1
    return math.nan


def equal_time_gap(run: dict[str, Any], ref: dict[str, Any]) -> float:
    """``run``'s test loss minus ``ref``'s at the shorter run's total CPU time (the longer
    run's loss interpolated there, see :func:`at_time`).

    Example:
        >>> fast = {"cpu_seconds": [1.0, 1.0], "evals": [{"step": 0, "test": 4.0},
        ...                                                {"step": 2, "test": 3.0}]}
        >>> slow = {"cpu_seconds": [2.0, 2.0], "evals": [{"step": 0, "test": 4.0},
        ...                                                {"step": 2, "test": 2.0}]}
        >>> equal_time_gap(fast, slow)  # at 2 s: 3.0 against 3.0
        0.0
    """
    t = min(sum(run["cpu_seconds"]), sum(ref["cpu_seconds"]))
    return at_time(run, t) - at_time(ref, t)


def steps_worth(run: dict[str, Any], baseline: dict[str, Any]) -> float:
    """The baseline step at which the baseline's test loss first equals ``run``'s final test
    loss (linear between eval points; NaN when the baseline never gets that high or low).

    Example:
        >>> base = {"evals": [{"step": 0, "test": 5.0}, {"step": 10, "test": 3.0}]}
        >>> steps_worth({"evals": [{"step": 10, "test": 4.0}]}, base)
        5.0
    """
    target = run["evals"][-1]["test"]
    points = [(e["step"], e["test"]) for e in baseline["evals"] if "test" in e]
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if v1 <= target <= v0:
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1) if v0 > v1 else float(s1)
    return math.nan


def seed_pairs(by: dict[tuple[str, int], dict[str, Any]], seeds: list[int], method: str,
               ref: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(run of ``method``, run of ``ref``) for every seed both ran."""
    return [(by[method, s], by[ref, s]) for s in seeds if (method, s) in by and (ref, s) in by]


def paired_table(by: dict[tuple[str, int], dict[str, Any]], seeds: list[int],
                 pairs_of: list[tuple[str, str]]) -> str:
    """Per (method, reference): the test-loss differences of the seeds both ran, at equal
    steps and at equal CPU time, and the CPU s/step ratio (a method paired with its
    :func:`benchmarks.budget.methods.reference` is named alone, any other pair ``"m vs ref"``)."""
    rows = []
    for m, ref in pairs_of:
        pairs = seed_pairs(by, seeds, m, ref)
        if not pairs:
            continue
        steps_d = [a["evals"][-1]["test"] - b["evals"][-1]["test"] for a, b in pairs]
        time_d = [equal_time_gap(a, b) for a, b in pairs]
        ratio = [a["cpu_seconds_per_step"] / b["cpu_seconds_per_step"] for a, b in pairs]
        name = m if ref == reference(m) else f"{m} vs {ref}"
        for label, d in (("equal steps", steps_d), ("equal CPU time", time_d)):
            rows.append([name, label, ", ".join(f"{x:+.4f}" for x in d),
                         f"{statistics.fmean(d):+.4f}", f"{sum(x < 0 for x in d)}/{len(d)}",
                         f"{statistics.fmean(ratio):.2f}"])
    return markdown_table(["method", "at", "per seed", "mean", "seeds better",
                           "CPU s/step ratio"], rows)


def gap_by_step(by: dict[tuple[str, int], dict[str, Any]], seeds: list[int],
                methods: list[str], ref: str = BASELINE) -> str:
    """Per method: its test loss minus ``ref``'s at each eval step both runs have, the mean
    over the seeds both ran; whether a gap closes with more steps or stays set.

    Example:
        >>> run = lambda *v: {"evals": [{"step": 10 * i, "test": x} for i, x in enumerate(v)]}
        >>> by = {("a", 0): run(4.0, 3.5, 3.2), ("b", 0): run(4.0, 3.0, 3.0)}
        >>> print(gap_by_step(by, [0], ["a", "b"], ref="b"))
        | method | seeds | 10 | 20 |
        | --- | --- | --- | --- |
        | a | 1 | +0.500 | +0.200 |
    """
    rows, steps = [], []
    for m in methods:
        pairs = seed_pairs(by, seeds, m, ref) if m != ref else []
        if not pairs:
            continue
        gaps: dict[int, list[float]] = {}
        for a, b in pairs:
            theirs = {e["step"]: e["test"] for e in b["evals"] if "test" in e}
            for e in a["evals"]:
                if e["step"] > 0 and "test" in e and e["step"] in theirs:
                    gaps.setdefault(e["step"], []).append(e["test"] - theirs[e["step"]])
        common = {k: v for k, v in gaps.items() if len(v) == len(pairs)}
        steps = sorted(set(steps) | set(common))
        rows.append((m, len(pairs), common))
    return markdown_table(["method", "seeds", *map(str, steps)],
                          [[m, str(n), *(f"{statistics.fmean(g[k]):+.3f}" if k in g else ""
                                         for k in steps)] for m, n, g in rows])


def budget_section(rows: list[dict[str, Any]]) -> list[str]:
    """A line per budget (the last budget row of each baseline: ``lora+gc``'s, then
    ``qlora+gc``'s), or nothing.

    Example:
        >>> row = {"phase": "budget", "budget_of": "qlora+gc", "margin": 0.1,
        ...        "qlora_gc_peak_bytes": 400 * MIB, "qlora_peak_bytes": 900 * MIB,
        ...        "budget_bytes": 440 * MIB, "batch_size": 4, "seq_len": 128,
        ...        "device": "cpu"}
        >>> print(*budget_section([row])[0].strip().split(", "), sep="\\n")
        QLoRA budget: QLoRA all (4-bit NF4 base) + GC peaks at 400.0 MiB (accounted)
        + 10% = **440.0 MiB**; QLoRA all without GC: 900.0 MiB (does not fit). 4 x 128 tokens
        cpu.
    """
    out = []
    for of, label in ((BASELINE, ("Budget", "LoRA all")),
                      (QLORA_BASELINE, ("QLoRA budget", "QLoRA all"))):
        budgets = [r for r in rows if r.get("phase") == "budget"
                   and r.get("budget_of", BASELINE) == of]
        if not budgets:
            continue
        b, peft = budgets[-1], METHODS[of].peft
        what = label[1] + (" (4-bit NF4 base)" if peft == "qlora" else "")
        out.append(f"{label[0]}: {what} + GC peaks at {b[f'{peft}_gc_peak_bytes'] / MIB:.1f} "
                   f"MiB (accounted), + {b['margin']:.0%} = **{b['budget_bytes'] / MIB:.1f} "
                   f"MiB**; {label[1]} without GC: {b[f'{peft}_peak_bytes'] / MIB:.1f} MiB "
                   f"(does not fit). {b['batch_size']} x {b['seq_len']} tokens, "
                   f"{b['device']}.\n")
    return out


def sweep_section(rows: list[dict[str, Any]]) -> list[str]:
    """The validation loss of every swept (method, rate), the chosen rate starred.

    Raises:
        ProtocolMismatch: sweeps of different lengths.
    """
    sweeps = [r for r in rows if r.get("phase") == "sweep"]
    if not sweeps:
        return []
    lengths = sorted({r["steps"] for r in sweeps})
    if len(lengths) > 1:
        raise ProtocolMismatch(f"the rows mix sweeps of {' / '.join(map(str, lengths))} "
                               "steps; give the files of one sweep length")
    chosen = chosen_lrs(rows)
    methods = list(dict.fromkeys(r["method"] for r in sweeps))
    lrs = sorted({r["lr"] for r in sweeps})
    table = [[m] + [next((f"{r['evals'][-1]['val']:.4f}" + (" *" if chosen[m] == lr else "")
                          for r in sweeps if r["method"] == m and r["lr"] == lr), "")
                    for lr in lrs] for m in methods]
    return ["Learning-rate sweep (seed 0, validation loss after "
            f"{sweeps[0]['steps']} steps):\n",
            markdown_table(["method", *[f"{lr:g}" for lr in lrs]], table) + "\n"]


def unfit_reason(row: dict[str, Any]) -> str:
    """Why the method of a fit row that does not fit was not run: its easiest step's
    prediction (IST under ``memory_budget``) or its measured peak and the planner's figure
    (GaLore / APOLLO).

    Example:
        >>> row = {"method": "galore+gc", "measured_peak_bytes": 1100 * MIB,
        ...        "measured_steps": 2, "budget_bytes": 950 * MIB, "limit_bytes": 950 * MIB,
        ...        "planned_peak_bytes": 1090 * MIB, "planned_layerwise_peak_bytes": 700 * MIB}
        >>> print(*unfit_reason(row).split(", "), sep="\\n")
        `galore+gc` (measured at 1100.0 MiB over 2 accounted steps
        the first recomputing the projectors
        > the budget 950.0 MiB; the planner predicts 1090.0 MiB
        and 700.0 MiB for its layer-wise form
        not run here)
    """
    r = row
    if "measured_peak_bytes" in r:
        return (f"`{r['method']}` (measured at {r['measured_peak_bytes'] / MIB:.1f} MiB over "
                f"{r['measured_steps']} accounted steps, the first recomputing the "
                f"projectors, > the budget {r['budget_bytes'] / MIB:.1f} MiB; the planner "
                f"predicts {r['planned_peak_bytes'] / MIB:.1f} MiB, and "
                f"{r['planned_layerwise_peak_bytes'] / MIB:.1f} MiB for its layer-wise "
                f"form, not run here)")
    return (f"`{r['method']}` (its easiest step, the top {len(r['active_layers'])} blocks "
            f"active with {len(r['checkpointed_layers'])} checkpointed, is predicted at "
            f"{r['best_case_peak_bytes'] / MIB:.1f} MiB > {r['limit_bytes'] / MIB:.1f} MiB, "
            f"the budget less its planning headroom)")


def unfit_section(rows: list[dict[str, Any]]) -> list[str]:
    """The methods that cannot fit their budget (not run), or nothing."""
    unfit = [r for r in rows if r.get("phase") == "fit" and not r["fits"]]
    if not unfit:
        return []
    return ["Not run, cannot fit the budget: "
            + "; ".join(unfit_reason(r) for r in unfit) + ".\n"]


def chosen_rate_section(by: Runs, seeds: list[int], methods: list[str], steps: int
                        ) -> list[str]:
    """Every method at its chosen rate: peak, whether it fits its budget (the QLoRA
    methods': the QLoRA budget), CPU s/step, blocks checkpointed per step, final test loss
    (mean and range over the seeds)."""
    rows_out = []
    for m in methods:
        runs = [by[m, s] for s in seeds if (m, s) in by]
        peak = max(r["peak_bytes"] for r in runs)
        fits = all(r.get("budget_bytes") is None or r["peak_bytes"] <= r["budget_bytes"]
                   for r in runs)
        rows_out.append([
            m, f"{runs[0]['lr']:g}", ", ".join(str(r["seed"]) for r in runs),
            f"{peak / 2**20:.1f}", "yes" if fits else "**no**",
            mean_range([r["cpu_seconds_per_step"] for r in runs], 2),
            "all" if METHODS.get(m, Method("", "", "")).checkpointing == "model" else
            mean_range([statistics.fmean(r["checkpointed_blocks"]) for r in runs], 1),
            mean_range([r["evals"][-1]["test"] for r in runs])])
    return [f"At the chosen rates ({steps} steps; peak = the most accounted bytes over "
            "every seed):\n",
            markdown_table(["method", "lr", "seeds", "peak MiB", "<= budget",
                            "CPU s/step", "blocks checkpointed/step",
                            f"test loss at step {steps}"], rows_out) + "\n"]


def peers_section(by: Runs, seeds: list[int], methods: list[str]) -> list[str]:
    """IST with adapters (run on more than one seed) paired with each full-parameter peer
    that ran (the layer-wise LISA and BAdam, the gradient-projection GaLore and APOLLO), or
    nothing."""
    versus = [(m, peer) for m in methods if METHODS.get(m) is not None
              and METHODS[m].peft == "lora" and METHODS[m].optimizer == "ist"
              and len([s for s in seeds if (m, s) in by]) > 1
              for peer in PEERS if peer in methods]
    if not versus:
        return []
    return ["IST with adapters vs the full-parameter peers (the same pairing, IST minus "
            "peer):\n",
            paired_table(by, seeds, versus) + "\n"]


def progress_section(by: Runs, seeds: list[int], methods: list[str], steps: int,
                     ref: str = BASELINE) -> list[str]:
    """Per method, the steps of ``ref`` its final test loss is worth, and the CPU s/step
    ratio at which it would tie ``ref`` at equal time."""
    worth = []
    for m in methods:
        pairs = seed_pairs(by, seeds, m, ref) if m != ref else []
        if pairs:
            w = [steps_worth(a, b) for a, b in pairs]
            ratio = statistics.fmean(a["cpu_seconds_per_step"] / b["cpu_seconds_per_step"]
                                     for a, b in pairs)
            need = [x / a["steps"] for x, (a, _b) in zip(w, pairs, strict=True)]
            worth.append([m, mean_range(w, 0), mean_range(need, 2), f"{ratio:.2f}"])
    return [f"Progress per step: the {ref} step whose test loss equals the "
            f"method's after {steps} steps, and the CPU s/step ratio to {ref} "
            f"at which the method would tie at equal time (= that step / {steps}):\n",
            markdown_table(["method", f"worth {ref} steps", "tie needs ratio <=",
                            "measured ratio"], worth) + "\n"]


def comparison_sections(by: Runs, seeds: list[int], methods: list[str], steps: int,
                        ref: str) -> list[str]:
    """The methods paired with ``ref`` (:func:`benchmarks.budget.methods.reference`): the paired
    differences, the full-parameter peers (``lora+gc`` only), progress per step and the
    gap over training; nothing when ``ref`` did not run."""
    if ref not in methods:
        return []
    paired = [m for m in methods if reference(m) == ref]
    where = "" if ref == BASELINE else " inside the QLoRA budget"
    out = [f"Paired test-loss differences vs {ref}{where} (method minus baseline, same "
           f"seed; negative = better; equal CPU time = the shorter run's total, the "
           f"other run's loss interpolated there):\n",
           paired_table(by, seeds, [(m, ref) for m in paired]) + "\n"]
    if ref == BASELINE:
        out += peers_section(by, seeds, methods)
    out += progress_section(by, seeds, [ref, *paired], steps, ref)
    out.append(f"The gap over training: test loss minus {ref}'s at the same step "
               "(mean over the seeds both ran):\n")
    out.append(gap_by_step(by, seeds, [ref, *paired], ref) + "\n")
    return out


def other_rates_section(rows: list[dict[str, Any]], finals: list[dict[str, Any]], by: Runs,
                        steps: int) -> list[str]:
    """Final runs at a rate other than the chosen one, against the chosen rate's run of the
    same seed, or nothing."""
    others = [r for r in rows if r.get("phase") == "final" and r not in finals]
    if not others:
        return []
    table = []
    for r in others:
        c = by.get((r["method"], r["seed"]))
        d = {k: r["evals"][-1][k] - c["evals"][-1][k] for k in ("val", "test")} if c else {}
        b = by.get((reference(r["method"]) or BASELINE, r["seed"]))
        table.append([r["method"], f"{r['lr']:g}", str(r["seed"]),
                      f"{r['evals'][-1]['test']:.4f}", f"{c['lr']:g}" if c else "",
                      f"{c['evals'][-1]['test']:.4f}" if c else "",
                      *(f"{d[k]:+.4f}" if d else "" for k in ("val", "test")),
                      f"{equal_time_gap(r, b):+.4f}" if b else ""])
    versus = (BASELINE if all(reference(r["method"]) in (None, BASELINE) for r in others)
              else f"its baseline ({BASELINE}; QLoRA: {QLORA_BASELINE})")
    return ["Finals at a rate other than the method's chosen one (a choice superseded "
            "by a later sweep, or a check of the choice; not in the tables above), "
            "against the chosen rate's run on the same seed (differences after "
            f"{steps} steps, negative = the other rate is better):\n",
            markdown_table(
                ["method", "lr", "seed", f"test loss at step {steps}", "chosen lr",
                 "chosen lr's test loss", "difference: validation", "difference: test",
                 f"test vs {versus} at equal CPU time"], table) + "\n"]


def report(rows: list[dict[str, Any]]) -> str:
    """The Markdown report of ``rows`` (every row ``budget.py`` wrote: budget, fit, sweep,
    final), the sections in the order of this module's docstring."""
    out = budget_section(rows) + sweep_section(rows) + unfit_section(rows)
    finals = final_runs(rows)
    if not finals:
        return "\n".join(out)
    order = list(METHODS)
    methods = sorted(dict.fromkeys(r["method"] for r in finals),
                     key=lambda m: order.index(m) if m in order else len(order))
    by = {(r["method"], r["seed"]): r for r in finals}
    seeds = sorted({r["seed"] for r in finals})
    steps = finals[0]["steps"]
    out += chosen_rate_section(by, seeds, methods, steps)
    out += comparison_sections(by, seeds, methods, steps, BASELINE)
    if BASELINE not in methods:  # the peers still pair with IST
        out += peers_section(by, seeds, methods)
    out += comparison_sections(by, seeds, methods, steps, QLORA_BASELINE)
    out += other_rates_section(rows, finals, by, steps)
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """The mean test loss of each method's finals against steps and against training CPU
    seconds, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = final_runs(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for m in dict.fromkeys(r["method"] for r in finals):
        runs = [r for r in finals if r["method"] == m]
        steps = [e["step"] for e in runs[0]["evals"]]
        mean = [statistics.fmean(r["evals"][i]["test"] for r in runs)
                for i in range(len(steps))]
        clock = [statistics.fmean(sum(r["cpu_seconds"][:s]) for r in runs) for s in steps]
        label = f"{m} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        axes[0].plot(steps, mean, marker=".", label=label)
        axes[1].plot(clock, mean, marker=".", label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training CPU seconds")
    axes[0].set_ylabel("test loss (mean over the seeds run)")
    axes[0].set_ylim(top=min(4.6, axes[0].get_ylim()[1]))
    axes[1].legend(fontsize=8)
    fig.suptitle("Inside one memory budget: held-out loss vs steps and vs CPU time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
