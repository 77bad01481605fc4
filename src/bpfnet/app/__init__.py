"""The app kit: what every app (lb, ddos, podnet) builds on — the controller contract the agent
drives, the client of the agent's API, and the agent's default paths."""
