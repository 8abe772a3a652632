"""Environments: the protocol (base.py), the registry (registry.py), the code sandbox, AppTown (built in),
AppWorld and ScienceWorld.

Kept free of JAX imports: sandbox workers import parts of this package in a fresh, isolated interpreter.
"""
