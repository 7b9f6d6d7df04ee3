"""Scaling `curate score` past one process: Ray Data scoring (:mod:`curate.scale.ray_scoring`)."""
