// Reads DICOM reports as a web viewer does (dcmjs, the parser of OHIF and Cornerstone) and prints, per file, what a
// TID 1500 measurement report says: its template, the device observer, each measurement group's source image,
// numeric measurements, coded evaluations and texts. Usage: node dcmjs_report.js FILE... (NODE_PATH: dcmjs's folder)
const fs = require("fs");
const dcmjs = require("dcmjs");

const first = (value) => (Array.isArray(value) ? value[0] : value);
const concept = (item) => first(item.ConceptNameCodeSequence) || {};
const code = (entry) => ({ value: entry.CodeValue, scheme: entry.CodingSchemeDesignator, meaning: entry.CodeMeaning });
const items = (item) => [].concat(item.ContentSequence || []);

function readReport(path) {
  const bytes = fs.readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(dcmjs.data.DicomMessage.readFile(buffer).dict);
  const template = first(dataset.ContentTemplateSequence) || {};
  const root = items(dataset);
  const device = root.find((item) => concept(item).CodeValue === "121012");
  const measurements = root.find((item) => concept(item).CodeValue === "126010");
  const groups = (measurements ? items(measurements) : []).filter((item) => concept(item).CodeValue === "125007");
  return {
    file: path,
    sopClassUID: dataset.SOPClassUID,
    title: code(concept(dataset)),
    template: template.TemplateIdentifier,
    mappingResource: template.MappingResource,
    deviceObserverUID: device ? device.UID : undefined,
    groups: groups.map((group) => {
      const content = items(group);
      const source = content.find((item) => item.ValueType === "IMAGE" && concept(item).CodeValue === "121112");
      return {
        sourceSOPInstanceUID: source ? first(source.ReferencedSOPSequence).ReferencedSOPInstanceUID : undefined,
        numbers: content
          .filter((item) => item.ValueType === "NUM")
          .map((item) => ({
            concept: code(concept(item)),
            value: Number(first(item.MeasuredValueSequence).NumericValue),
            unit: code(first(first(item.MeasuredValueSequence).MeasurementUnitsCodeSequence)),
          })),
        codes: content
          .filter((item) => item.ValueType === "CODE")
          .map((item) => ({ concept: code(concept(item)), value: code(first(item.ConceptCodeSequence)) })),
        texts: content
          .filter((item) => item.ValueType === "TEXT")
          .map((item) => ({ concept: code(concept(item)), value: item.TextValue })),
        images: content
          .filter((item) => item.ValueType === "IMAGE")
          .map((item) => ({
            concept: code(concept(item)),
            sopClassUID: first(item.ReferencedSOPSequence).ReferencedSOPClassUID,
            sopInstanceUID: first(item.ReferencedSOPSequence).ReferencedSOPInstanceUID,
          })),
      };
    }),
  };
}

console.log(JSON.stringify(process.argv.slice(2).map(readReport)));
