"""``python -m training.model_card``: the measured parts of ``weights/README.md``, generated from
committed ``vqa-eval --json`` results and the checkpoint's own training record, so no accuracy,
calibration or training figure in the model card is typed by hand.

    vqa-eval weights/easy-vqa.safetensors --json > weights/eval/easy-vqa.json
    vqa-eval PREVIOUS.safetensors --json > weights/eval/previous-templates-only.json
    vqa-eval REPRODUCTION.safetensors --json > weights/eval/reproduction.json   # optional
    python -m training.model_card           # rewrite the generated sections of weights/README.md
    python -m training.model_card --check   # exit 1 when they are out of date

Each generated section sits between ``<!-- model-card:NAME:begin -->`` and
``<!-- model-card:NAME:end -->``; everything else in the file is prose and left alone. The test
suite re-evaluates the shipped file, checks it matches ``weights/eval/easy-vqa.json``, and checks
the README is what this module renders from it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from models import load_checkpoint

from .evaluate import format_report

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CARD = WEIGHTS_DIR / "README.md"
SHIPPED = WEIGHTS_DIR / "easy-vqa.safetensors"
RESULTS = {  # row label in the comparison table -> committed vqa-eval --json output
    "previous": WEIGHTS_DIR / "eval" / "previous-templates-only.json",
    "shipped": WEIGHTS_DIR / "eval" / "easy-vqa.json",
    "reproduction": WEIGHTS_DIR / "eval" / "reproduction.json",
}
LABELS = {
    "previous": "previous checkpoint (templates only)",
    "shipped": "**this checkpoint**",
    "reproduction": "reproduction run (`vqa-train`, same defaults)",
}


def _pct(part: dict) -> str:
    return f"{100 * part['accuracy']:.2f}% ({part['correct']:,}/{part['questions']:,})"


def _points(x: float) -> str:
    return f"{100 * x:.2f}"


def measured_section(results: dict[str, dict]) -> str:
    shipped = results["shipped"]
    text = format_report(shipped, Path("weights/easy-vqa.safetensors"))
    natural = shipped["natural_phrasings"]
    lines = ["```bash", "vqa-eval weights/easy-vqa.safetensors", "```", "", "```", text, "```", "",
             "| checkpoint | sha256 | test split | natural phrasings (held out) | ECE, points (test / natural) |",
             "|---|---|---|---|---|"]
    for key in ("previous", "shipped", "reproduction"):
        r = results.get(key)
        if r is None:
            continue
        n = r["natural_phrasings"]
        lines.append(f"| {LABELS[key]} | `{r['checkpoint_sha256'][:12]}…` | {_pct(r)} | {_pct(n)} | "
                     f"{_points(r['expected_calibration_error'])} / {_points(n['expected_calibration_error'])} |")
    lines += ["", f"Calibration: on the test split the model claims {100 * shipped['mean_confidence']:.2f}% on "
              f"average and is right {100 * shipped['accuracy']:.2f}% of the time (expected calibration "
              f"error {_points(shipped['expected_calibration_error'])} points, 15 equal-width bins); on the "
              f"natural phrasings {100 * natural['mean_confidence']:.2f}% vs {100 * natural['accuracy']:.2f}% "
              f"({_points(natural['expected_calibration_error'])} points)."]
    if "previous" in results:
        p = results["previous"]
        lines[-1] += (f" The previous checkpoint: {_points(p['expected_calibration_error'])} and "
                      f"{_points(p['natural_phrasings']['expected_calibration_error'])} points.")
    return "\n".join(lines)


def training_section(info: dict) -> str:
    hist = info["history"]
    sel = next(h for h in hist if h["epoch"] == info["selected_epoch"])
    first = next((h["epoch"] for h in hist if h["val_acc"] >= 1.0), None)
    per_epoch = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(hist, hist[1:])]
    line = (f"* recorded in the checkpoint: {info['machine']}, torch {info['torch']}, device {info['device']}; "
            f"training time **{info['train_seconds']:,.0f} s** (`train_seconds`), the fastest epoch "
            f"{min(per_epoch):.0f} s, the slowest {max(per_epoch):,.0f} s\n"
            f"* selected epoch {info['selected_epoch']} of {len(hist)} (validation accuracy "
            f"{100 * sel['val_acc']:.2f}%, loss {sel['val_loss']:.4f})")
    if first is not None:
        line += f"; validation accuracy first reached 100% at epoch {first}"
    return line


def render(card: str, results: dict[str, dict], info: dict) -> str:
    for name, body in (("training", training_section(info)), ("measured", measured_section(results))):
        pattern = re.compile(rf"(<!-- model-card:{name}:begin[^>]*-->\n)(?:.*?\n)?(<!-- model-card:{name}:end -->)", re.S)
        if not pattern.search(card):
            raise ValueError(f"no model-card:{name} markers in the model card")
        card = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), card)
    return card


def load_results() -> dict[str, dict]:
    return {k: json.loads(p.read_text()) for k, p in RESULTS.items() if p.is_file()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.model_card", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if weights/README.md is not up to date")
    args = p.parse_args(argv)
    card = CARD.read_text()
    new = render(card, load_results(), load_checkpoint(SHIPPED).info)
    if args.check:
        if new != card:
            sys.exit("weights/README.md is out of date: run python -m training.model_card")
        return
    CARD.write_text(new)


if __name__ == "__main__":
    main()
