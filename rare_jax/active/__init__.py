"""The active loop: state, selections, linear fits, metrics, labelers, the runner."""
