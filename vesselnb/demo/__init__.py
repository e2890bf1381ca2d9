"""The embedded demo: synthetic angiograms, a tiny demo Sa2VA-contract model, demo training checkpoints.

Placeholder: being written. Contract: ``ensure_demo_assets(root) -> DemoAssets`` (see docs/contracts.md).
"""
