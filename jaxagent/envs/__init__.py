"""Environments: the protocol and registry (base.py), the code sandbox, AppTown (built in) and ScienceWorld.

Kept free of JAX imports: sandbox workers import parts of this package in a fresh, isolated interpreter.
"""
