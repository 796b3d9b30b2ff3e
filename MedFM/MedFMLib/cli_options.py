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


def add_server_options(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--server", metavar="URL", help=help_text)
    parser.add_argument("--token", help="the server's token (default: $MEDFM_TOKEN)")
    parser.add_argument("--ca-cert", help="CA certificate of a server with its own TLS certificate (or $MEDFM_CA_CERT)")
