"""Quality evaluation of cache policies: metrics, the policy x budget sweep, plots."""
