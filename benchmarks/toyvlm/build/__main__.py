"""`python -m benchmarks.toyvlm.build [STAGE ...]`: train the toy VLM from scratch and export it to
vlm/weights/toy-vlm (the
same as `erasure toy build-vlm`). The build itself lives in `benchmarks/toyvlm/build/`, one file per stage."""

from benchmarks.toyvlm.build import main

if __name__ == "__main__":
    main()
