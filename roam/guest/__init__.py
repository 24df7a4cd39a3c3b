"""The guest side of roam: the agent that runs in the VM and the host library that talks to it."""
