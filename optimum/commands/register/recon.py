"""Registers `optimum-cli recon prune|eval` through optimum's command-plugin namespace.

Kept lightweight: optimum-cli imports every register module at start-up, so the heavy imports happen
inside `run`.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class ReconCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="recon", help="Prune LLMs and reconstruct them block by block (optimum-recon).")

    @staticmethod
    def parse_args(parser):
        from optimum_recon.cli import add_subcommands

        add_subcommands(parser)

    def run(self):
        from optimum_recon.cli import run_args

        code = run_args(self.args, self.parser)
        if code:
            raise SystemExit(code)


REGISTER_COMMANDS = [ReconCommand]
