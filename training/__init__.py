"""Training-side tools of D3SR: losses (DISTS, EA-DISTS), degradation, evaluation."""
