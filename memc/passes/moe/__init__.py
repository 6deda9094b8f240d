"""MoE passes: detect-moe (sites.moe), moe-calibrate (moe.calibration), prune-experts."""
