"""`medfm bench`: which benchmark the options ask for, and its report."""

from __future__ import annotations

import argparse
import json

from ..errors import MedFMError


def cmd_bench(args: argparse.Namespace) -> int:
    from ..cli import server_credentials
    from .clicks import format_report, run_benchmark

    args.size = args.size or (128 if args.clients else 512)
    args.slices = args.slices or (24 if args.clients else 100)
    if args.size < 16 or args.first_clicks < 1 or args.clicks < 1 or args.slices < 2:
        raise MedFMError("--size must be at least 16, --slices at least 2, and --first-clicks and --clicks at least 1.")
    if args.clients is not None:
        if not args.server or args.clients < 1:
            raise MedFMError("--clients needs --server and at least one client, e.g. --server URL --clients 20.")
        from .load import format_load_report, run_load_benchmark

        token, ca_cert = server_credentials(args)
        result = run_load_benchmark(args.server, token, args.clients, args.model, clicks=args.clicks, size=args.size,
                                    slices=args.slices, ca_cert=ca_cert)  # fmt: skip
        print(json.dumps(result) if args.json else format_load_report(result))
        return 1 if result["errors"] else 0
    if args.server:
        from .remote import format_remote_report, run_remote_benchmark

        token, ca_cert = server_credentials(args)
        result = run_remote_benchmark(
            args.server,
            token,
            args.model,
            device=args.device,
            random_weights=args.random_weights,
            checkpoint=args.checkpoint,
            ca_cert=ca_cert,
            size=args.size,
            slices=args.slices,
            first_clicks=args.first_clicks,
            clicks=args.clicks,
        )
        print(json.dumps(result) if args.json else format_remote_report(result))
        return 0
    if args.finetune:
        from .finetune import format_finetune_report, run_finetune_benchmark

        result = run_finetune_benchmark(args.model, device=args.device, checkpoint=args.checkpoint,
                                        random_weights=args.random_weights, slices=args.slices)  # fmt: skip
        print(json.dumps(result) if args.json else format_finetune_report(result))
        return 0
    if args.ray_serve:
        from .ray_serve import format_ray_serve_report, run_ray_serve_benchmark

        size = args.size if args.size != 512 else 256  # a 512² default is the single-process benchmark's
        result = run_ray_serve_benchmark(args.model, args.random_weights, args.device, size=size,
                                         slices=min(args.slices, 24), clicks=args.clicks)  # fmt: skip
        print(json.dumps(result) if args.json else format_ray_serve_report(result))
        return 0 if result["masks_equal"] else 1
    if args.annotate:
        from .annotate import format_annotate_report, run_annotate_benchmark

        result = run_annotate_benchmark(args.annotate, args.model, device=args.device, checkpoint=args.checkpoint,
                                        random_weights=args.random_weights, runtime=args.runtime,
                                        fast=args.fast)  # fmt: skip
        print(json.dumps(result) if args.json else format_annotate_report(result))
        return 1 if result["failed"] else 0
    if args.evaluate:
        from .evaluation import format_evaluation_report, run_evaluation_benchmark

        result = run_evaluation_benchmark(args.evaluate, args.model, device=args.device, checkpoint=args.checkpoint,
                                          random_weights=args.random_weights)  # fmt: skip
        print(json.dumps(result) if args.json else format_evaluation_report(result))
        return 1 if result["failed"] else 0
    if _is_volume_model(args.model):
        from ..console import note
        from .volume3d import format_volume_report, parse_sizes, run_volume_benchmark

        result = run_volume_benchmark(args.model, device=args.device, checkpoint=args.checkpoint,
                                      random_weights=args.random_weights, sizes=parse_sizes(args.volume_sizes),
                                      further=args.clicks if args.clicks != 20 else 3, progress=note)  # fmt: skip
        print(json.dumps(result) if args.json else format_volume_report(result))
        return 0
    if args.compare_runtimes:
        from ..console import note
        from .runtimes import format_runtime_comparison, run_runtime_comparison

        result = run_runtime_comparison(args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
                                        size=args.size, first_clicks=args.first_clicks, further_clicks=args.clicks,
                                        fast=args.fast, notify=note)  # fmt: skip
        print(json.dumps(result) if args.json else format_runtime_comparison(result))
        return 0
    if args.propagate:
        from .propagation import format_propagation_report, run_propagation_benchmark

        result = run_propagation_benchmark(
            args.model,
            device=args.device,
            checkpoint=args.checkpoint,
            random_weights=args.random_weights,
            size=args.size,
            slices=args.slices,
        )
        print(json.dumps(result) if args.json else format_propagation_report(result))
        return 0
    result = run_benchmark(
        args.model,
        device=args.device,
        checkpoint=args.checkpoint,
        random_weights=args.random_weights,
        size=args.size,
        first_clicks=args.first_clicks,
        further_clicks=args.clicks,
        background=args.background,
        runtime=args.runtime,
        fast=args.fast,
        zoom=args.zoom,
    )
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _is_volume_model(name: str) -> bool:
    from ..models.store import ModelStore

    return ModelStore().info(name).kind == "volume"
