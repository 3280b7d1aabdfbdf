from lab.cli import main

if __name__ == "__main__":
    rc = main()
    from lab.distributed import exit_process

    exit_process(rc)  # torchrun ranks on NCCL end here (no interpreter teardown); others return
    raise SystemExit(rc)
