from lab import startup

startup.mark("main")  # the interpreter is up and the lab package imported

from lab.cli import main  # noqa: E402

if __name__ == "__main__":
    rc = main()
    from lab.distributed import exit_process

    exit_process(rc)  # torchrun ranks on NCCL end here (no interpreter teardown); others return
    raise SystemExit(rc)
