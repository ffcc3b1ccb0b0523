from edgeres.cli import main

if __name__ == "__main__":
    main(prog_name="edgeres")   # `python -m edgeres` reads like the console script (usage lines, shell completion)
