"""Side-by-side benchmarks: each module runs the stock component and ours in one run."""
