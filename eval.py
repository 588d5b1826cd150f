from pix2tex.eval import main
if __name__ == "__main__":
    main()
