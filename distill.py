from pix2tex.distill.main import main
if __name__ == "__main__":
    main()
