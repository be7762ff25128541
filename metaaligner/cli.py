"""`metaaligner` command line: thin subcommands over the library, all driven by the shared config."""

from __future__ import annotations

import argparse
import sys

from metaaligner.config import load_config


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (shared schema); flags override its values")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")


def _reformulate(args) -> int:
    from metaaligner.data.pipeline import run_reformulation

    cfg = load_config(args.config, {
        "storage.endpoint_url": args.endpoint_url,
        "reformulate.input": args.input, "reformulate.output": args.output, "reformulate.format": args.format,
        "reformulate.objectives": args.objectives, "reformulate.template": args.template,
        "reformulate.seed": args.seed, "reformulate.score_decimals": args.score_decimals,
    })
    if cfg.reformulate is None:
        raise SystemExit("reformulate: give --input and --output (or a config with a reformulate section)")
    summary = run_reformulation(cfg.reformulate, cfg.storage)
    print(f"reformulated {summary['valid_pairs']} pairs into {summary['items_total']} items "
          f"({summary['quarantined']} quarantined) in {summary['wall_time_s']:.1f}s -> {cfg.reformulate.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaaligner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reformulate", help="preference pairs -> contrastive/equal correction items (Ray Data)")
    _add_config(p)
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--format", choices=["canonical", "ultrafeedback", "hh_rlhf_scores"])
    p.add_argument("--objectives", help="hh_rlhf | ultrafeedback | imhi | PATH.yaml")
    p.add_argument("--template", choices=["paper", "hh_rlhf", "ultrafeedback", "imhi"])
    p.add_argument("--seed", type=int)
    p.add_argument("--score-decimals", type=int)
    p.set_defaults(func=_reformulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"metaaligner {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
