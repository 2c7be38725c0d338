"""Commands registered on mtmim_cli.app.app (import heavy modules inside the commands)."""
