"""What the scripts show people: plots (curves, confusion matrices, summary pages), metrics
(top-k, calibration) and corruptions (seeded image corruptions for robustness). Uses files/ only.
"""
