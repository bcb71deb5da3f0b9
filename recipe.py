"""The whole SnapFusion recipe at toy scale, in one command, and a report with the paper's tables and figures.

The flags and the steps are in snapfusion_min/cli/recipe.py; installed, this is also ``snapfusion-recipe`` and
``python -m snapfusion_min recipe``. ``python recipe.py --help`` shows every flag with its default.
"""

from snapfusion_min.cli import recipe_command as recipe

if __name__ == "__main__":
    recipe.entry()
