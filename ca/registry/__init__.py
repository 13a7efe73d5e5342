"""Registration logic: entries, agents, foreign bundles, and which agent may have which entry."""
