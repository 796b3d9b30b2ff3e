"""Options several commands share (runtime, server); in a module of their own so command modules need not import cli."""

from __future__ import annotations

import argparse


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime", default="auto", choices=["auto", "torch", "openvino"],
        help="what runs a SAM-family encoder: auto (OpenVINO on a CPU when installed), torch, openvino",
    )  # fmt: skip
    parser.add_argument(
        "--fast", action="store_true",
        help="OpenVINO in bf16 where the CPU has it (avx512_bf16, AMX): faster; masks may shift slightly",
    )  # fmt: skip
    parser.add_argument(
        "--no-zoom", dest="zoom", action="store_const", const=False, default=None,
        help="never decode a small object on a crop around its box too (LiteMedSAM does by default: a better "
             "outline of a small lesion, for a second encode on its first box)",
    )  # fmt: skip


def add_server_options(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--server", metavar="URL", help=help_text)
    parser.add_argument("--token", help="the server's token (default: $MEDFM_TOKEN)")
    parser.add_argument("--ca-cert", help="CA certificate of a server with its own TLS certificate (or $MEDFM_CA_CERT)")
