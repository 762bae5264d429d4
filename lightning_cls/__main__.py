def run() -> None:
    # Imported here, not at the top: worker processes that the server spawns re-import this module, and should not
    # pay for importing Lightning and the whole command line each time.
    from lightning_cls.cli import main

    main()


if __name__ == "__main__":
    run()
