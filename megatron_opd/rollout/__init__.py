"""Rollouts: the resharding planner and executor, the vLLM engine wrapper, served teachers."""
