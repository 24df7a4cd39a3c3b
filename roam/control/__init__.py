"""The control plane: a store of the fleet's state, an API over it, a scheduler and a
reconciler that place and move VMs, and the node agent that runs them (docs/CONTROL.md)."""
