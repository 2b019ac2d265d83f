"""Shipped scaling-law priors in the scaling.json format (fastvit.scaling.load_prior): cpu.json (fitted on
the project's own Imagenette runs) and gpu.json (fitted on published ImageNet-1k ViT results). Each file
holds its points, their sources and the leave-one-budget-out error; bench/scaling_priors.py rebuilds them."""
