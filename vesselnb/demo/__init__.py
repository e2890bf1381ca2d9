"""The embedded demo: synthetic angiograms, a tiny Sa2VA-shaped demo model, demo training checkpoints.

``ensure_demo_assets(root) -> DemoAssets`` builds everything once (seconds on a CPU); see docs/contracts.md,
"Demo assets". The demo model is not Sa2VA: it has Sa2VA's keys, files and ``predict_forward`` contract at a few
hundred thousand weights, so every stage of vesselnb can run without downloading a real checkpoint.
"""

from vesselnb.demo.assets import DemoAssets, DemoSettings, ensure_demo_assets

__all__ = ["DemoAssets", "DemoSettings", "ensure_demo_assets"]
