"""The agent: the loop that ties envs, memory, engines and learners together, and the CLI."""
