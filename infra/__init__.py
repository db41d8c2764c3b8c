"""The local stack: launcher CLI, install scripts, system checks, whole-stack load scripts."""
