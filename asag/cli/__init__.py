"""asag's command line on users' own diffusers pipelines: generate, compare, sweep, evaluate."""
