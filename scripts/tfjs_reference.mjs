// Reference outputs of a TFJS graph model, computed by tfjs itself (pure-JS CPU backend) in node.
//
// usage: node scripts/tfjs_reference.mjs MODEL_JSON INPUT_F32 N,H,W,C OUTPUT_NODE OUT_F32
//   INPUT_F32 / OUT_F32 are raw little-endian float32 arrays (NHWC input). Needs `@tensorflow/tfjs@4.22.0` resolvable
//   from NODE_PATH (e.g. NODE_PATH=/work/cache/node/node_modules); tfjs-node is not needed.
import fs from 'fs';
import path from 'path';
import { createRequire } from 'module';

const require = createRequire(path.join(process.env.NODE_PATH || process.cwd(), 'x.js'));
const tf = require('@tensorflow/tfjs');

const [modelJson, inputFile, shapeArg, outputNode, outFile] = process.argv.slice(2);
const spec = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
const dir = path.dirname(modelJson);
const weightSpecs = [];
const buffers = [];
for (const group of spec.weightsManifest) {
  weightSpecs.push(...group.weights);
  for (const p of group.paths) buffers.push(fs.readFileSync(path.join(dir, p)));
}
const all = Buffer.concat(buffers);
const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
await tf.setBackend('cpu');
const model = await tf.loadGraphModel(tf.io.fromMemory({
  modelTopology: spec.modelTopology, weightSpecs, weightData, format: spec.format,
  generatedBy: spec.generatedBy, convertedBy: spec.convertedBy, userDefinedMetadata: spec.userDefinedMetadata,
}));
const shape = shapeArg.split(',').map(Number);
const raw = fs.readFileSync(inputFile);
const x = tf.tensor(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), shape, 'float32');
const y = model.execute(x, outputNode);
const data = await y.data();
fs.writeFileSync(outFile, Buffer.from(new Float32Array(data).buffer));
console.log(JSON.stringify({ output: outputNode, shape: y.shape, tfjs: tf.version.tfjs, backend: tf.getBackend() }));
