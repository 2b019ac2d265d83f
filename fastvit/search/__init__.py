"""fastvit.search: choose the ViT for a budget without training it (As-ViT's κ and L, measured speed).

    fastvit-search --data OUT --hours 24 --out DIR      # table + DIR/best.yaml for fastvit-train --config

measures.py (κ, L), space.py (candidates, growth proposals), rank.py (rank sum, growth step; pure),
probe.py (measured speed at the planner's stages -> images in the budget), cli.py (the command).
"""
