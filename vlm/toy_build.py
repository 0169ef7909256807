"""`python -m vlm.toy_build [STAGE ...]`: train the toy VLM from scratch and export it to vlm/weights/toy-vlm (the
same as `erasure toy build-vlm`). The build itself lives in `vlm/toy/`, one file per stage."""

from vlm.toy import main

if __name__ == "__main__":
    main()
